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

import functools
import math
import reprlib
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from bilinear_lens.files.names import WEIGHTS_FILE
from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.models.checkpoint import FORMAT_NAME, check_finite, check_state_dict
from bilinear_lens.models.config import TORCH_DTYPES, ModelConfig
from bilinear_lens.models.hook_names import CheckedActivationCache, check_hook_names
from bilinear_lens.models.hub import resolve_model_dir
from bilinear_lens.models.loading import PAPER_FORMAT, read_model_files, save_model
from bilinear_lens.models.mlp import make_mlp
from bilinear_lens.models.paper_checkpoints import read_paper_checkpoint
from bilinear_lens.models.sampling import check_sampling_args, sample_next_token
from bilinear_lens.models.weight_views import AttentionWeightViews, StackedWeightViews


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


class Attention(AttentionWeightViews, nn.Module):
    """Causal multi-head self-attention returning ``(out, pattern)``.

    ``accepts_pattern_fn``: TransformerLens' ``AttentionBridge`` passes its
    ``hook_pattern`` as ``pattern_fn`` so bridge hooks can edit the pattern in place.
    When no hook watches the scores or pattern and no mask or ``pattern_fn`` is given,
    the fused ``scaled_dot_product_attention`` kernel runs instead (same math, faster);
    ``pattern`` is then ``None``. ``W_Q``/``W_K``/``W_V``/``W_O`` (and ``b_*``) are
    TransformerLens views of the projections (see :mod:`bilinear_lens.models.weight_views`).
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


def _hook_label(hook: Callable) -> str:
    fn = hook.func if isinstance(hook, functools.partial) else hook
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def shape_checked_hook(hook: Callable) -> Callable:
    """``hook`` (a TransformerLens forward hook ``fn(activation, hook)``) wrapped so that a
    return value other than ``None`` must be a tensor of the activation's shape: otherwise
    a one-line ``ValueError`` (``TypeError`` for a non-tensor) names the hook point, the hook
    function and both shapes, instead of a shape error deep inside a later layer. Costs one
    shape comparison per call."""
    if getattr(hook, "_bilinear_lens_shape_checked", False):
        return hook

    @functools.wraps(hook)
    def checked(activation: Any, *args: Any, **kwargs: Any) -> Any:
        result = hook(activation, *args, **kwargs)
        if result is None or not isinstance(activation, Tensor):
            return result
        if not isinstance(result, Tensor):
            point = kwargs.get("hook", args[0] if args else None)
            raise TypeError(
                f"forward hook {_hook_label(hook)} on {getattr(point, 'name', None)!r} returned "
                f"{type(result).__name__}: a hook must return None or a tensor of the activation's shape "
                f"{tuple(activation.shape)}"
            )
        if result.shape != activation.shape:
            point = kwargs.get("hook", args[0] if args else None)
            raise ValueError(
                f"forward hook {_hook_label(hook)} on {getattr(point, 'name', None)!r} returned shape "
                f"{tuple(result.shape)}, but the activation there has shape {tuple(activation.shape)}: "
                "a hook must return None or a tensor of the same shape"
            )
        return result

    checked._bilinear_lens_shape_checked = True  # type: ignore[attr-defined]
    return checked


class BilinearTransformer(StackedWeightViews, HookedRootModule):
    """Decoder-only transformer whose MLPs are ``cfg.mlp_kind`` (bilinear by default).

    ``forward(tokens)`` returns logits ``[batch, pos, d_vocab]``; ``return_type="loss"``
    gives the mean next-token cross-entropy, ``"both"`` a ``(logits, loss)`` pair.
    TransformerLens' stacked weights (``W_Q ... W_out``) come from
    :class:`~bilinear_lens.models.weight_views.StackedWeightViews`; ``run_with_cache``
    returns a ``transformer_lens.ActivationCache``.
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

    # ---- hook checks: an unknown name fails loudly, with close matches; a forward hook's
    # return value must keep the activation's shape (see shape_checked_hook) ----
    def add_hook(self, name: Any, hook: Any, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if isinstance(name, str):
            check_hook_names(self.hook_dict, [name], where=f"{type(self).__name__}")
        super().add_hook(name, hook, *args, **kwargs)

    def check_and_add_hook(  # type: ignore[override]
        self, hook_point: HookPoint, hook_point_name: str, hook: Callable, dir: Any = "fwd", *args: Any, **kwargs: Any
    ) -> None:
        if dir == "fwd":
            hook = shape_checked_hook(hook)
        super().check_and_add_hook(hook_point, hook_point_name, hook, dir, *args, **kwargs)

    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Any) -> None:  # type: ignore[override]
        check_hook_names(self.hook_dict, [name], where=f"{type(self).__name__}")
        super()._enable_hook_with_name(name, shape_checked_hook(hook) if dir == "fwd" else hook, dir)

    def _enable_hooks_for_points(  # type: ignore[override]
        self, hook_points: Any, enabled: Callable, hook: Callable, dir: Any
    ) -> None:
        super()._enable_hooks_for_points(hook_points, enabled, shape_checked_hook(hook) if dir == "fwd" else hook, dir)

    def run_with_cache(  # type: ignore[override]
        self, *args: Any, names_filter: Any = None, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs: Any
    ) -> tuple[Any, Union[ActivationCache, dict[str, Tensor]]]:
        """TransformerLens' ``run_with_cache``: ``(output, ActivationCache)`` (a plain dict with
        ``return_cache_object=False``). String names in ``names_filter`` are checked, and so
        are the cache's lookups: the cache is a
        :class:`~bilinear_lens.models.hook_names.CheckedActivationCache`, whose ``cache[key]``
        raises ``UnknownHookError`` with close matches for a name the model lacks."""
        if isinstance(names_filter, str) or (
            isinstance(names_filter, (list, tuple)) and all(isinstance(n, str) for n in names_filter)
        ):
            names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
            check_hook_names(self.hook_dict, names, where=f"{type(self).__name__}")
        out, cache = super().run_with_cache(*args, names_filter=names_filter, remove_batch_dim=remove_batch_dim, **kwargs)
        if not return_cache_object:
            return out, cache
        return out, CheckedActivationCache(cache, self, has_batch_dim=not remove_batch_dim)

    # ---- what ActivationCache's decompositions ask of the model ----
    def tokens_to_residual_directions(
        self, tokens: Union[str, int, Int[Tensor, "..."]]
    ) -> Float[Tensor, "... d_model"]:
        """The unembedding columns of ``tokens`` (a string is one token): ``W_U[:, t]``."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        index = torch.as_tensor(tokens, device=self.unembed.weight.device)
        return self.unembed.weight[index]

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Float[Tensor, "d_model"]:
        """Sum of the attention-output and MLP-output biases written to the residual stream
        before block ``layer`` (``mlp_input``: plus block ``layer``'s attention bias); zeros
        without biases."""
        total = torch.zeros(self.cfg.d_model, device=self.embed.weight.device, dtype=self.embed.weight.dtype)
        for index, block in enumerate(self.blocks[: layer + (1 if mlp_input else 0)]):
            if block.attn.b_O is not None:
                total = total + block.attn.b_O
            mlp = getattr(block, "mlp", None)
            if include_mlp_biases and index < layer and mlp is not None and mlp.b_out is not None:
                total = total + mlp.b_out
        return total

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
        loss_per_token: bool = False,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ) -> Any:
        """Run the model (TransformerLens semantics for the arguments TransformerLens has).

        Text input is tokenized with :meth:`to_tokens` (``prepend_bos``, ``padding_side``);
        a padded batch gets an attention mask, positions counted from each row's first
        real token, and a loss over real tokens only. ``loss_per_token``: the loss is
        ``[batch, pos - 1]`` instead of the mean.

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
            if isinstance(input, str) or (isinstance(input, list) and input):
                tokens, text_mask = self._tokens_and_mask(input, prepend_bos, padding_side)
                if text_mask is not None and attention_mask is None:
                    attention_mask = text_mask
                    position_ids = (text_mask.cumsum(-1) - 1).clamp(min=0) if position_ids is None else position_ids
            else:
                tokens = input
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
        return _by_return_type(logits, return_type, tokens, loss_per_token, attention_mask)

    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor):
            what = "an empty list" if isinstance(tokens, list) else type(tokens).__name__
            raise ValueError(f"input must be text, a non-empty list of texts or a [batch, pos] token tensor, got {what}")
        if tokens.numel() == 0:
            raise ValueError(f"tokens must hold at least one token, got shape {tuple(tokens.shape)}")
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

    @property
    def default_prepend_bos(self) -> bool:
        """TransformerLens' ``cfg.default_prepend_bos``: True when the tokenizer has a BOS token
        (ours: ``<|endoftext|>``), False for tokenizers without one (the paper's models were
        trained without BOS)."""
        return self.tokenizer is not None and self.tokenizer.bos_token_id is not None

    def _bos_token_id(self) -> int:
        """The BOS id; a tokenizer without one uses its EOS token, as TransformerLens does."""
        tok = self._require_tokenizer()
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise ValueError("prepend_bos=True but the tokenizer has neither a BOS nor an EOS token")
        return bos

    def _tokens_and_mask(
        self, text: Union[str, list[str]], prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None
    ) -> tuple[Int[Tensor, "batch pos"], Optional[Int[Tensor, "batch pos"]]]:
        """Token ids of ``text`` padded to one width, and the attention mask (``None`` when
        every row has the same length). ``prepend_bos=None``: :attr:`default_prepend_bos`;
        ``padding_side``: ``"right"`` (default) or ``"left"``."""
        if padding_side not in (None, "right", "left"):
            raise ValueError(f"padding_side={padding_side!r} is invalid: allowed 'right', 'left'")
        texts = _text_list(text)
        tok = self._require_tokenizer()
        ids = [tok.encode(t, add_special_tokens=False) for t in texts]
        if self.default_prepend_bos if prepend_bos is None else prepend_bos:
            ids = [[self._bos_token_id()] + i for i in ids]
        width = max(len(i) for i in ids)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        out = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, i in enumerate(ids):
            cols = slice(width - len(i), width) if padding_side == "left" else slice(0, len(i))
            out[row, cols] = torch.tensor(i, dtype=torch.long)
            mask[row, cols] = 1
        device = self.embed.weight.device
        return out.to(device), (None if bool(mask.all()) else mask.to(device))

    def to_tokens(
        self, text: Union[str, list[str]], prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None
    ) -> Int[Tensor, "batch pos"]:
        """Tokenize ``text`` (TransformerLens semantics): ``prepend_bos=None`` follows
        :attr:`default_prepend_bos`; a ragged list is padded with the pad token on
        ``padding_side`` (``"right"`` by default)."""
        return self._tokens_and_mask(text, prepend_bos, padding_side)[0]

    def to_string(self, tokens: Union[Tensor, list[int]]) -> Union[str, list[str]]:
        tok = self._require_tokenizer()
        if isinstance(tokens, Tensor) and tokens.dim() == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        ids = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
        return tok.decode(ids)

    def to_str_tokens(self, input: Union[str, Tensor, list[int]], prepend_bos: Optional[bool] = None) -> list[str]:
        if not isinstance(input, (str, Tensor, list, tuple)):
            raise ValueError(f"input must be a str, a token tensor or a list of token ids, got {type(input).__name__}")
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
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        stop_at_eos: bool = True,
        eos_token_id: Optional[int] = None,
        prepend_bos: Optional[bool] = None,
        seed: Optional[int] = None,
    ) -> Union[str, Tensor]:
        """Sample continuations (TransformerLens' arguments; greedy when ``temperature == 0``).

        ``top_k`` / ``top_p`` restrict sampling (:mod:`bilinear_lens.models.sampling`).
        ``stop_at_eos``: a row that produced ``eos_token_id`` (default: the tokenizer's EOS)
        continues with EOS and generation ends when every row has. A string input returns
        a string; token input returns ``[batch, pos + new]`` ids.
        """
        check_sampling_args(temperature, top_k, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: must be an integer >= 0")
        tokens = self.to_tokens(input, prepend_bos=prepend_bos) if isinstance(input, str) else input
        self._check_tokens(tokens)
        if eos_token_id is None and stop_at_eos and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        gen = torch.Generator(device=tokens.device)
        if seed is not None:
            gen.manual_seed(seed)
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -self.cfg.n_ctx :])[:, -1]
            nxt = sample_next_token(logits, temperature, top_k, top_p, generator=gen)
            if stop_at_eos and eos_token_id is not None:
                nxt = nxt.masked_fill(finished[:, None], eos_token_id)
                finished |= nxt[:, 0] == eos_token_id
            tokens = torch.cat([tokens, nxt], dim=1)
            if bool(finished.all()):
                break
        return self.to_string(tokens[0]) if isinstance(input, str) else tokens

    # ---- persistence (formats: bilinear_lens.models.loading; files: .checkpoint, .hf_llama, .hub) ----
    def save_pretrained(self, path: Union[str, Path], format: str = FORMAT_NAME) -> Path:
        """Write the model to directory ``path`` atomically (nothing is written on an error).

        ``format="bilinear-lens"``: ``config.json`` + ``model.safetensors`` (+ tokenizer files).
        ``format="hf"``: the Hugging Face Llama layout (``config.json`` with ``model_type``
        and ``architectures``, ``model.safetensors``, ``generation_config.json``, tokenizer
        files) that ``transformers.AutoModelForCausalLM`` and TransformerLens'
        ``TransformerBridge.boot_transformers`` load without this package; configs Llama
        cannot express raise ``ValueError`` naming the field.
        """
        return save_model(self, path, format=format)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> "BilinearTransformer":
        """Load our checkpoint directory, an HF Llama-format directory (``hidden_act`` linear
        or silu), one of the paper's released checkpoints (converted), or a hub id (``owner/name``, through ``huggingface_hub.snapshot_download``,
        respecting ``HF_HUB_OFFLINE`` and the local cache). Safetensors only: never unpickles."""
        return load_model(path, device=device)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """Upload the HF Llama-format export to the hub repo ``repo_id`` (see
        :func:`bilinear_lens.models.hub.push_model_dir`; ``kwargs`` go to it)."""
        from bilinear_lens.models.hub import push_model_dir

        return push_model_dir(lambda directory: self.save_pretrained(directory, format="hf"), repo_id, **kwargs)


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> BilinearTransformer:
    """Load a model directory or hub id in any format (see :meth:`BilinearTransformer.from_pretrained`);
    every error is one line naming the file. Refused: missing/unexpected tensors, shape or
    dtype mismatches, NaN/inf weights, a ``config.json`` that differs from the config the
    weights were saved with (recorded in the safetensors metadata), corrupt tokenizer files.
    The formats are read as data by :func:`~bilinear_lens.models.loading.read_model_files`
    (the paper's released checkpoints converted on the fly); the model is built here, once."""
    from bilinear_lens.distributed import resolve_device

    # the project's one device rule, before any file is read: "bogus" or CUDA on a machine
    # without it is a one-line ValueError naming device=, not torch's RuntimeError
    device = resolve_device(device, what="device")
    files = read_model_files(path)
    model = model_from_state_dict(files.cfg, files.state, files.tokenizer, where=str(files.weights_path))
    files.check_records()  # after the shape check (its message is more specific)
    if files.format == PAPER_FORMAT:
        model.eval()  # as load_paper_checkpoint
    return model.to(device)


def load_paper_checkpoint(
    source: Union[str, Path], tokenizer: Union[str, Path, None] = None, with_tokenizer: bool = True
) -> BilinearTransformer:
    """A :class:`BilinearTransformer` (in eval mode) from one of the paper's checkpoint
    directories or hub ids; ``tokenizer`` / ``with_tokenizer`` as in
    :func:`~bilinear_lens.models.paper_checkpoints.read_paper_checkpoint`."""
    path = resolve_model_dir(source)
    cfg, state, tok = read_paper_checkpoint(path, tokenizer=tokenizer, with_tokenizer=with_tokenizer)
    return model_from_state_dict(cfg, state, tok, where=str(path / WEIGHTS_FILE)).eval()


def model_from_state_dict(cfg: ModelConfig, state: dict[str, Tensor], tokenizer: Any, where: str) -> BilinearTransformer:
    """A model of ``cfg`` holding ``state``; missing/unexpected tensors, shape or dtype
    mismatches and NaN/inf values raise one-line :class:`CheckpointError` s naming ``where``."""
    model = BilinearTransformer(cfg, tokenizer=tokenizer)
    expected = model.state_dict()
    check_state_dict(expected, state, where=where)
    for key, tensor in state.items():
        if tensor.dtype != expected[key].dtype:
            raise CheckpointError(f"{where}: {key} has dtype {tensor.dtype}, config says {expected[key].dtype}")
    check_finite(state, where=where)
    model.load_state_dict(state)
    return model


def _text_list(text: Any) -> list[str]:
    """``text`` (a str or a non-empty list/tuple of str) as a list; anything else is a
    one-line ``ValueError`` naming what was given."""
    if isinstance(text, str):
        return [text]
    if not isinstance(text, (list, tuple)):
        raise ValueError(f"text must be a str or a non-empty list of str, got {type(text).__name__}")
    if not text:
        raise ValueError("text must be a str or a non-empty list of str, got an empty list")
    for index, item in enumerate(text):
        if not isinstance(item, str):
            raise ValueError(
                f"text must be a str or a non-empty list of str, got a list holding {type(item).__name__} "
                f"{reprlib.repr(item)} at index {index}"
            )
    return list(text)


def _by_return_type(
    logits: Float[Tensor, "batch pos d_vocab"],
    return_type: Optional[str],
    tokens: Optional[Int[Tensor, "batch pos"]],
    loss_per_token: bool,
    attention_mask: Optional[Tensor],
) -> Any:
    """What :meth:`BilinearTransformer.forward` returns for ``return_type``."""
    if return_type == "logits":
        return logits
    if return_type is None:
        return None
    if return_type not in ("loss", "both"):
        raise ValueError(f"return_type={return_type!r}; allowed: 'logits', 'loss', 'both', None")
    if tokens is None:
        raise ValueError(f"return_type={return_type!r} with start_at_layer needs tokens= for the loss")
    loss = next_token_loss(logits, tokens, per_token=loss_per_token, attention_mask=attention_mask)
    return loss if return_type == "loss" else (logits, loss)


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    per_token: bool = False,
    attention_mask: Optional[Int[Tensor, "batch pos"]] = None,
) -> Tensor:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]`` (mean, or
    ``[batch, pos-1]``). With ``attention_mask`` (1 = real token) the mean runs over
    predictions of real tokens from real tokens; per-token values at padding are 0. Computed in
    float32, or float64 for float64 logits.

    Checked (one-line ``ValueError`` naming the argument): ``logits`` is ``[batch, pos,
    d_vocab]``, ``tokens`` an integer ``[batch, pos]`` of the same batch and positions
    (``attention_mask`` too), and the mean needs ``pos >= 2`` (a next token to predict)."""
    _check_loss_inputs(logits, tokens, attention_mask, per_token)
    log_probs = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None]).squeeze(-1)
    if attention_mask is None:
        return nll if per_token else nll.mean()
    keep = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(nll.dtype)
    return nll * keep if per_token else (nll * keep).sum() / keep.sum()


def _check_loss_inputs(logits: Any, tokens: Any, attention_mask: Any, per_token: bool) -> None:
    """Shapes and dtypes for :func:`next_token_loss` (no device sync: shapes only)."""
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        what = f"{logits.dtype} tensor of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a float [batch, pos, d_vocab] tensor, got {what}")
    if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.is_floating_point() or tokens.dtype == torch.bool:
        what = f"{tokens.dtype} tensor of shape {tuple(tokens.shape)}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an integer [batch, pos] tensor, got {what}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} and logits {tuple(logits.shape)} disagree: the logits must be "
            "[batch, pos, d_vocab] for the same batch and positions as the tokens"
        )
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.shape != tokens.shape):
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the tokens' shape {tuple(tokens.shape)}, got {shape}")
    if not per_token and tokens.shape[1] < 2:
        raise ValueError(
            f"the mean next-token loss needs at least 2 positions (a token and its next), got tokens of shape "
            f"{tuple(tokens.shape)}"
        )


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
