"""A small decoder-only transformer with TransformerLens hook points everywhere.

``BilinearTransformer`` is a :class:`transformer_lens.HookedRootModule`, so
``run_with_cache`` / ``run_with_hooks`` / ``hooks()`` work on it directly with
TransformerLens' hook names, and :func:`bilinear_lens.models.bridge.to_bridge` wraps it in a
``TransformerBridge``. Module layout (what the bridge adapter maps)::

    embed (nn.Embedding)            hook_embed
    pos_embed (nn.Embedding)        hook_pos_embed          (positional_embedding_type="standard")
    blocks[l]                       hook_resid_pre, hook_attn_out, hook_resid_mid,
                                    hook_mlp_out, hook_resid_post
      ln1, ln2                      hook_scale, hook_normalized
      attn (q, k, v, o: nn.Linear)  hook_q, hook_k, hook_v, hook_rot_q, hook_rot_k,
                                    hook_attn_scores, hook_pattern, hook_z
      mlp (see bilinear_lens.models.mlp)   hook_in, hook_pre, [hook_pre_linear], hook_post, hook_out
    ln_final                        hook_scale, hook_normalized
    unembed (nn.Linear, no bias)

Shapes follow TransformerLens: ``hook_q/k/v/z`` are ``[batch, pos, head_index, d_head]``,
``hook_attn_scores``/``hook_pattern`` are ``[batch, head_index, query_pos, key_pos]``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from bilinear_lens.data.tokenizer import load_tokenizer, to_hf_tokenizer
from bilinear_lens.models.checkpoint import (
    CONFIG_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    atomic_directory,
    check_state_dict,
    read_model_config,
    read_tensors,
    write_model_dir,
)
from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.hook_names import check_hook_names
from bilinear_lens.models.mlp import make_mlp

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class _Normalization(nn.Module):
    """Shared part of the four norms: ``(x - [mean]) / sqrt(mean(x^2) + eps)`` through
    ``hook_scale`` (``[batch, pos, 1]``) and ``hook_normalized`` (``[batch, pos, d_model]``)."""

    centers = False

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def normalize(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        if self.centers:
            x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale)


class RMSNorm(_Normalization):
    """``x / rms(x) * w`` (``w`` learned)."""

    def __init__(self, d_model: int, eps: float):
        super().__init__(eps)
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.normalize(x) * self.weight


class RMSNormPre(_Normalization):
    """``x / rms(x)``: parameter-free RMSNorm (the bilinear paper's choice)."""

    def __init__(self, d_model: int, eps: float):
        super().__init__(eps)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.normalize(x)


class LayerNorm(_Normalization):
    """``(x - mean) / std * w + b``."""

    centers = True

    def __init__(self, d_model: int, eps: float):
        super().__init__(eps)
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.normalize(x) * self.weight + self.bias


class LayerNormPre(_Normalization):
    """``(x - mean) / std``: parameter-free LayerNorm."""

    centers = True

    def __init__(self, d_model: int, eps: float):
        super().__init__(eps)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.normalize(x)


NORMS: dict[Optional[str], Callable[[int, float], nn.Module]] = {
    "RMS": RMSNorm,
    "RMSPre": RMSNormPre,
    "LN": LayerNorm,
    "LNPre": LayerNormPre,
    None: lambda d_model, eps: nn.Identity(),
}


class Rotary(nn.Module):
    """Rotary position embedding tables (rotate-half convention, as in GPT-NeoX/Llama-HF)."""

    cos: Tensor
    sin: Tensor

    def __init__(self, d_head: int, n_ctx: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.float64) / d_head))
        angles = torch.outer(torch.arange(n_ctx, dtype=torch.float64), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)  # [n_ctx, d_head]
        # Not saved in checkpoints: rebuilt from the config.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(
        self, x: Float[Tensor, "batch pos head d_head"], position_ids: Int[Tensor, "batch pos"]
    ) -> Float[Tensor, "batch pos head d_head"]:
        cos = self.cos[position_ids].unsqueeze(2).to(x.dtype)
        sin = self.sin[position_ids].unsqueeze(2).to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    """Causal multi-head self-attention returning ``(out, pattern)``.

    ``accepts_pattern_fn``: TransformerLens' ``AttentionBridge`` passes its
    ``hook_pattern`` as ``pattern_fn`` so bridge hooks can edit the pattern in place.
    When no hook watches the scores or pattern and no mask or ``pattern_fn`` is given,
    the fused ``scaled_dot_product_attention`` kernel runs instead (same math, faster);
    ``pattern`` is then ``None``.
    """

    accepts_pattern_fn = True

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        d_attn = cfg.n_heads * cfg.d_head
        self.q = nn.Linear(cfg.d_model, d_attn, bias=cfg.attn_bias)
        self.k = nn.Linear(cfg.d_model, d_attn, bias=cfg.attn_bias)
        self.v = nn.Linear(cfg.d_model, d_attn, bias=cfg.attn_bias)
        self.o = nn.Linear(d_attn, cfg.d_model, bias=cfg.attn_bias)
        self.rotary = (
            Rotary(cfg.d_head, cfg.n_ctx, cfg.rotary_base)
            if cfg.positional_embedding_type == "rotary"
            else None
        )
        self.hook_q = HookPoint()  # [batch, pos, head_index, d_head]
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_rot_q = HookPoint()
        self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head_index, query_pos, key_pos]
        self.hook_pattern = HookPoint()
        self.hook_z = HookPoint()  # [batch, pos, head_index, d_head]

    def _pattern_needed(self) -> bool:
        return self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks()

    def forward(
        self,
        hidden_states: Float[Tensor, "batch pos d_model"],
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Int[Tensor, "batch pos"]] = None,
        pattern_fn: Optional[Callable[[Tensor], Tensor]] = None,
        **kwargs: Any,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Optional[Tensor]]:
        batch, pos, _ = hidden_states.shape
        split = (batch, pos, self.n_heads, self.d_head)
        q = self.hook_q(self.q(hidden_states).view(split))
        k = self.hook_k(self.k(hidden_states).view(split))
        v = self.hook_v(self.v(hidden_states).view(split))
        if self.rotary is not None:
            if position_ids is None:
                position_ids = torch.arange(pos, device=q.device).expand(batch, pos)
            q = self.hook_rot_q(self.rotary(q, position_ids))
            k = self.hook_rot_k(self.rotary(k, position_ids))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head, pos, d_head]

        if pattern_fn is None and attention_mask is None and not self._pattern_needed():
            z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            pattern = None
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.d_head)
            mask = torch.ones(pos, pos, dtype=torch.bool, device=q.device).triu(1)
            if attention_mask is not None:  # [batch, pos], 1 = keep (HF convention)
                mask = mask | ~attention_mask.bool()[:, None, None, :]
            scores = self.hook_attn_scores(scores.masked_fill(mask, float("-inf")))
            pattern = self.hook_pattern(scores.softmax(-1).nan_to_num(0.0))
            if pattern_fn is not None:
                pattern = pattern_fn(pattern)
            z = pattern @ v
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        return self.o(z.reshape(batch, pos, -1)), pattern


class TransformerBlock(nn.Module):
    """Pre-norm block: ``resid += attn(ln1(resid)); resid += mlp(ln2(resid))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = NORMS[cfg.normalization_type](cfg.d_model, cfg.eps)
        self.attn = Attention(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()
        self.hook_resid_post = HookPoint()
        if not cfg.attn_only:
            assert cfg.d_mlp is not None
            self.ln2 = NORMS[cfg.normalization_type](cfg.d_model, cfg.eps)
            self.mlp = make_mlp(cfg.mlp_kind, cfg.d_model, cfg.d_mlp, bias=cfg.mlp_bias)
            self.hook_resid_mid = HookPoint()
            self.hook_mlp_out = HookPoint()

    def forward(
        self,
        hidden_states: Float[Tensor, "batch pos d_model"],
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> tuple[Float[Tensor, "batch pos d_model"]]:
        resid = self.hook_resid_pre(hidden_states)
        attn_out, _ = self.attn(self.ln1(resid), attention_mask=attention_mask, position_ids=position_ids)
        resid = resid + self.hook_attn_out(attn_out)
        if hasattr(self, "mlp"):
            resid = self.hook_resid_mid(resid)
            resid = self._add_mlp_out(resid, self.mlp(self.ln2(resid)))
        # Tuple return: the HF/TransformerBridge block convention.
        return (self.hook_resid_post(resid),)

    def _add_mlp_out(
        self, resid_mid: Float[Tensor, "batch pos d_model"], mlp_out: Float[Tensor, "batch pos d_model"]
    ) -> Float[Tensor, "batch pos d_model"]:
        """``resid_mid + hook_mlp_out(mlp_out)``: the block's step after its MLP."""
        return resid_mid + self.hook_mlp_out(mlp_out)

    def forward_from_mlp(
        self, resid_mid: Float[Tensor, "batch pos d_model"], hook: str, mlp_acts: Mapping[str, Tensor]
    ) -> Float[Tensor, "batch pos d_model"]:
        """The block's output (``hook_resid_post``), resumed inside its MLP right after the
        MLP hook point ``hook`` fired.

        ``resid_mid`` is the value of ``hook_resid_mid`` and ``mlp_acts`` holds the MLP
        activations ``mlp.forward_after`` needs (``mlp.resume_inputs(hook)``); only the hook
        points after ``hook`` run. With the values a full forward pass had there, the result
        equals that pass's ``hook_resid_post`` exactly: ablation sweeps restart copies here.
        """
        return self.hook_resid_post(self._add_mlp_out(resid_mid, self.mlp.forward_after(hook, mlp_acts)))


class BilinearTransformer(HookedRootModule):
    """Decoder-only transformer whose MLPs are ``cfg.mlp_kind`` (bilinear by default).

    ``forward(tokens)`` returns logits ``[batch, pos, d_vocab]``; ``return_type="loss"``
    gives the mean next-token cross-entropy, ``"both"`` a ``(logits, loss)`` pair.
    """

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer  # a transformers PreTrainedTokenizerFast, or None
        # nn.Linear's default init draws from the global RNG; fork it so building a model
        # never shifts the caller's random stream (init_weights then seeds its own).
        with torch.random.fork_rng(devices=[]):
            self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model)
            self.hook_embed = HookPoint()  # [batch, pos, d_model]
            if cfg.positional_embedding_type == "standard":
                self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
                self.hook_pos_embed = HookPoint()
            self.blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
            self.ln_final = NORMS[cfg.normalization_type](cfg.d_model, cfg.eps)
            self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, bias=False)
        init_weights(self, cfg)
        self.to(TORCH_DTYPES[cfg.dtype])
        self.setup()  # registers every HookPoint by name (HookedRootModule)

    # ---- hook-name checks: an unknown name fails loudly, with close matches ----
    def add_hook(self, name: Any, hook: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if isinstance(name, str):
            check_hook_names(self.hook_dict, [name], where=f"{type(self).__name__}")
        super().add_hook(name, hook, *args, **kwargs)

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Any) -> None:  # type: ignore[override]
        check_hook_names(self.hook_dict, [name], where=f"{type(self).__name__}")
        super()._enable_hook_with_name(name, hook, dir)

    def run_with_cache(self, *args: Any, names_filter: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """TransformerLens' ``run_with_cache``; string names in ``names_filter`` are checked."""
        if isinstance(names_filter, str) or (
            isinstance(names_filter, (list, tuple)) and all(isinstance(n, str) for n in names_filter)
        ):
            names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
            check_hook_names(self.hook_dict, names, where=f"{type(self).__name__}")
        return super().run_with_cache(*args, names_filter=names_filter, **kwargs)

    # ---- TransformerLens-style weight views ([d_vocab, d_model] etc.) ----
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.weight.T

    @property
    def W_pos(self) -> Optional[Float[Tensor, "n_ctx d_model"]]:
        return self.pos_embed.weight if hasattr(self, "pos_embed") else None

    def forward(
        self,
        input: Union[str, list[str], Int[Tensor, "batch pos"], Float[Tensor, "batch pos d_model"]],
        return_type: Optional[str] = "logits",
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        start_at_layer: Optional[int] = None,
        stop_at_layer: Optional[int] = None,
        tokens: Optional[Int[Tensor, "batch pos"]] = None,
    ) -> Any:
        """Run the model (TransformerLens semantics for the layer range).

        ``start_at_layer=l``: ``input`` is the residual stream entering block ``l``
        (``blocks.{l}.hook_resid_pre``, ``[batch, pos, d_model]``) and the embedding and
        earlier blocks are skipped; pass ``tokens`` too for a loss. ``stop_at_layer=l``:
        return the residual stream entering block ``l`` (exclusive; ``0`` runs only the
        embedding) instead of logits.
        """
        n_layers = self.cfg.n_layers
        for name, value in (("start_at_layer", start_at_layer), ("stop_at_layer", stop_at_layer)):
            if value is not None and not 0 <= value <= n_layers:
                raise ValueError(f"{name}={value} is out of range [0, {n_layers}]")
        if start_at_layer is None:
            tokens = self.to_tokens(input) if isinstance(input, (str, list)) else input
            self._check_tokens(tokens)
            batch, pos = tokens.shape
        else:
            if not isinstance(input, Tensor) or input.dim() != 3 or input.shape[-1] != self.cfg.d_model:
                shape = tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__
                raise ValueError(
                    f"with start_at_layer the input is the residual stream [batch, pos, {self.cfg.d_model}], got {shape}"
                )
            batch, pos = input.shape[:2]
        if position_ids is None:
            device = input.device if isinstance(input, Tensor) else self.embed.weight.device
            position_ids = torch.arange(pos, device=device).expand(batch, pos)
        if start_at_layer is None:
            assert tokens is not None
            resid = self.hook_embed(self.embed(tokens))
            if hasattr(self, "pos_embed"):
                resid = resid + self.hook_pos_embed(self.pos_embed(position_ids))
        else:
            resid = input
        for block in self.blocks[start_at_layer or 0 : stop_at_layer]:
            (resid,) = block(resid, attention_mask=attention_mask, position_ids=position_ids)
        if stop_at_layer is not None:
            return resid
        logits = self.unembed(self.ln_final(resid))
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if tokens is None:
            raise ValueError(f"return_type={return_type!r} with start_at_layer needs tokens= for the loss")
        loss = next_token_loss(logits, tokens)
        if return_type == "loss":
            return loss
        if return_type == "both":
            return logits, loss
        raise ValueError(f"return_type={return_type!r}; allowed: 'logits', 'loss', 'both', None")

    def _check_tokens(self, tokens: Tensor) -> None:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        pos = tokens.shape[1]
        if pos > self.cfg.n_ctx:
            raise ValueError(f"input has {pos} positions but the model's n_ctx is {self.cfg.n_ctx}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if pos and (int(tokens.max()) >= self.cfg.d_vocab or int(tokens.min()) < 0):
            raise ValueError(
                f"token ids must lie in [0, {self.cfg.d_vocab}), got range "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )

    # ---- tokenizer conveniences (TransformerLens names) ----
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids, or attach one with model.tokenizer = ...")
        return self.tokenizer

    def to_tokens(self, text: Union[str, list[str]], prepend_bos: bool = True) -> Int[Tensor, "batch pos"]:
        """Tokenize ``text`` (right-padded with the pad token when a list has ragged lengths)."""
        tok = self._require_tokenizer()
        texts = [text] if isinstance(text, str) else list(text)
        ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        if prepend_bos:
            if tok.bos_token_id is None:
                raise ValueError("prepend_bos=True but the tokenizer has no BOS token")
            ids = [[tok.bos_token_id] + i for i in ids]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out = torch.full((len(ids), width), pad, dtype=torch.long)
        for row, i in enumerate(ids):
            out[row, : len(i)] = torch.tensor(i, dtype=torch.long)
        return out.to(self.embed.weight.device)

    def to_string(self, tokens: Union[Tensor, list[int]]) -> Union[str, list[str]]:
        tok = self._require_tokenizer()
        if isinstance(tokens, Tensor) and tokens.dim() == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        return tok.decode(ids)

    def to_str_tokens(self, input: Union[str, Tensor], prepend_bos: bool = True) -> list[str]:
        tokens = self.to_tokens(input, prepend_bos) if isinstance(input, str) else input
        tokens = tokens.flatten() if isinstance(tokens, Tensor) else tokens
        return [self._require_tokenizer().decode([int(t)]) for t in tokens]

    def to_single_token(self, text: str) -> int:
        ids = self._require_tokenizer().encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens, not one: {ids}")
        return ids[0]

    @torch.no_grad()
    def generate(
        self,
        input: Union[str, Int[Tensor, "batch pos"]],
        max_new_tokens: int = 20,
        temperature: float = 1.0,
        seed: Optional[int] = None,
    ) -> Union[str, Tensor]:
        """Sample continuations (greedy when ``temperature == 0``)."""
        tokens = self.to_tokens(input) if isinstance(input, str) else input
        gen = torch.Generator(device=tokens.device)
        if seed is not None:
            gen.manual_seed(seed)
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -self.cfg.n_ctx :])[:, -1]
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                probs = (logits / temperature).softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=gen)
            tokens = torch.cat([tokens, nxt], dim=1)
        return self.to_string(tokens[0]) if isinstance(input, str) else tokens

    # ---- persistence (files: bilinear_lens.models.checkpoint) ----
    def save_pretrained(self, path: Union[str, Path]) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``) atomically."""
        return save_model(self, path)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "BilinearTransformer":
        """Load a model saved by :meth:`save_pretrained` (safetensors: never unpickles)."""
        return load_model(path, device=device)


def save_model(model: BilinearTransformer, path: Union[str, Path]) -> Path:
    """Atomically write ``model`` to directory ``path`` (see :mod:`bilinear_lens.models.checkpoint`)."""
    with atomic_directory(path) as tmp:
        write_model_dir(tmp, model.cfg.to_dict(), model.state_dict(), getattr(model, "tokenizer", None))
    return Path(path)


def load_config(path: Union[str, Path]) -> ModelConfig:
    """Read and validate ``config.json`` of a model directory."""
    return ModelConfig.from_dict(read_model_config(path), where=str(Path(path) / CONFIG_FILE))


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> BilinearTransformer:
    """Load a :class:`BilinearTransformer` saved by :func:`save_model`; every error names the file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg = load_config(path)
    tokenizer = None
    if (path / TOKENIZER_FILE).is_file():
        tokenizer = to_hf_tokenizer(load_tokenizer(path / TOKENIZER_FILE))
    model = BilinearTransformer(cfg, tokenizer=tokenizer)
    state = read_tensors(path / WEIGHTS_FILE, device="cpu", what="model weights")
    expected = model.state_dict()
    check_state_dict(expected, state, where=str(path / WEIGHTS_FILE))
    for key, tensor in state.items():
        if tensor.dtype != expected[key].dtype:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: {key} has dtype {tensor.dtype}, config says {expected[key].dtype}")
    model.load_state_dict(state)
    return model.to(device)


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], per_token: bool = False
) -> Tensor:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]`` (mean, or ``[batch, pos-1]``),
    computed in float32, or float64 for float64 logits."""
    log_probs = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return nll if per_token else nll.mean()


def init_weights(model: BilinearTransformer, cfg: ModelConfig) -> None:
    """The same rule for every MLP kind, so kinds compare fairly: linear and embedding
    weights ~ N(0, init_range) (GPT-2), output projections (``attn.o``, ``mlp.out``) scaled
    by ``1/sqrt(2 n_layers)`` (residual-stream growth), biases 0, norm scales 1. Seeded by
    ``cfg.seed`` through a private generator, so the global RNG is untouched."""
    gen = torch.Generator().manual_seed(cfg.seed)
    out_scale = 1.0 / math.sqrt(2 * cfg.n_layers)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_output = name.endswith(("attn.o", "mlp.out"))
                std = cfg.init_range * (out_scale if is_output else 1.0)
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, (RMSNorm, LayerNorm)):
                module.weight.fill_(1.0)
                if isinstance(module, LayerNorm):
                    module.bias.zero_()


def build_model(cfg: ModelConfig | None = None, tokenizer: Any = None, **overrides: Any) -> BilinearTransformer:
    """Build a freshly initialised model: ``build_model(ModelConfig(...))`` or
    ``build_model(mlp_kind="relu", d_model=64, ...)``."""
    cfg = (cfg or ModelConfig()).replace(**overrides) if overrides else (cfg or ModelConfig())
    return BilinearTransformer(cfg, tokenizer=tokenizer)
