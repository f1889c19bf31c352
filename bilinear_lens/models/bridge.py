"""TransformerLens 4 integration: an architecture adapter for :class:`BilinearTransformer`.

TransformerLens 4 loads models through ``TransformerBridge`` and discovers third-party
architectures through the entry-point group ``transformer_lens.architectures``; this
package registers :class:`BilinearLensArchitectureAdapter` there under
:data:`ARCHITECTURE_NAME` (see ``pyproject.toml``). :func:`to_bridge` wraps a built or
loaded model::

    bridge = to_bridge(model)                       # or load_bridge("runs/tiny/final")
    logits, cache = bridge.run_with_cache(tokens)
    cache["blocks.0.mlp.hook_pre"]                  # [batch, pos, d_mlp]

Hook names through the bridge (all TransformerLens-standard): ``hook_embed``,
``blocks.{l}.hook_resid_pre/hook_attn_out/hook_resid_mid/hook_mlp_out/hook_resid_post``,
``blocks.{l}.ln1/ln2.hook_scale/hook_normalized``, ``blocks.{l}.attn.hook_q/hook_k/hook_v``
(``[batch, pos, head, d_head]``, before rotary), ``hook_pattern``, ``hook_z``,
``blocks.{l}.mlp.hook_in/hook_pre/hook_pre_linear/hook_post/hook_out``, ``ln_final.*``,
``hook_unembed``. Differences from the model's own ``run_with_cache``: the bridge has
no ``hook_rot_q/hook_rot_k`` and its ``attn.hook_attn_scores`` is fired post hoc with the
pattern (a TransformerLens bridge behaviour); use the model's own hooks for the true
pre-softmax scores. Plain MLPs (relu/gelu/linear) have no ``hook_pre_linear`` on either path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
from transformer_lens.model_bridge.bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components import (
    AttentionBridge,
    BlockBridge,
    EmbeddingBridge,
    GatedMLPBridge,
    LayerNormPreBridge,
    LinearBridge,
    MLPBridge,
    NormalizationBridge,
    PosEmbedBridge,
    RMSNormalizationBridge,
    RMSNormPreBridge,
    UnembeddingBridge,
)
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.mlp_kinds import mlp_kind_spec
from bilinear_lens.models.model import BilinearTransformer

ARCHITECTURE_NAME = "BilinearLensTransformer"



class BilinearMLPBridge(GatedMLPBridge):
    """``GatedMLPBridge`` for a GLU without activation.

    TransformerLens' gated bridge resolves its activation from the config and falls back
    to SiLU for unknown names, which would silently turn a bilinear layer into SwiGLU once
    weights are processed (``enable_compatibility_mode``). This bridge computes the
    processed path with the identity; the default path delegates to our module.
    """

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        if not getattr(self, "_use_processed_weights", False):
            return super().forward(*args, **kwargs)
        x = self.hook_in(args[0])
        W_gate, b_gate = self._processed_projection("gate")
        W_in, b_in = self._processed_projection("in")
        W_out, b_out = self._processed_projection("out")
        pre = self.gate.hook_out(torch.nn.functional.linear(x, W_gate, b_gate))
        pre_linear = getattr(self, "in").hook_out(torch.nn.functional.linear(x, W_in, b_in))
        post = self.out.hook_in(self.elementwise(pre, pre_linear))
        return self.hook_out(self.out.hook_out(torch.nn.functional.linear(post, W_out, b_out)))

    def elementwise(self, pre: Tensor, pre_linear: Tensor) -> Tensor:
        """The elementwise step of our module (the identity activation times the linear half)."""
        return self.original_component.post_from_pre(pre, pre_linear)


def _norm_bridge(name: str, cfg: Any) -> GeneralizedComponent:
    kind = cfg.normalization_type
    if kind == "RMS":
        return RMSNormalizationBridge(name=name, config=cfg)
    if kind == "RMSPre":
        return RMSNormPreBridge(name=name, config=cfg)
    if kind == "LNPre":
        return LayerNormPreBridge(name=name, config=cfg)
    if kind == "LN":
        return NormalizationBridge(name=name, config=cfg)
    return GeneralizedComponent(name=name, config=cfg)


def _mlp_bridge(cfg: Any) -> GeneralizedComponent:
    spec = mlp_kind_spec(cfg.bilinear_lens_mlp_kind)
    if spec.gated:
        cls = BilinearMLPBridge if spec.is_bilinear else GatedMLPBridge
        return cls(
            name="mlp",
            config=cfg,
            submodules={
                "gate": LinearBridge(name="gate"),
                "in": LinearBridge(name="in"),
                "out": LinearBridge(name="out"),
            },
        )
    # Plain kinds (relu/gelu/linear): MLPBridge always delegates to our module's forward,
    # so the activation (identity for "linear") is never re-derived from the config.
    return MLPBridge(name="mlp", config=cfg, submodules={"in": LinearBridge(name="in"), "out": LinearBridge(name="out")})


class BilinearLensArchitectureAdapter(ArchitectureAdapter):
    """Maps :class:`BilinearTransformer` (wrapped in :class:`BridgeContainer`) onto
    TransformerLens' component tree: ``embed``, ``pos_embed``, ``blocks.{l}.{ln1, attn
    (q/k/v/o), ln2, mlp (gate/in/out)}``, ``ln_final``, ``unembed``."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.cfg.gated_mlp = not cfg.attn_only and mlp_kind_spec(cfg.bilinear_lens_mlp_kind).gated
        self.cfg.uses_rms_norm = cfg.normalization_type in ("RMS", "RMSPre")
        # Q/K/V/O are nn.Linear [out, in]; TransformerLens' W_Q etc. index [head, d_model, d_head].
        self.weight_processing_conversions = {**self._qkvo_weight_conversions(include_biases=True)}
        block_submodules: dict[str, GeneralizedComponent] = {
            "ln1": _norm_bridge("ln1", self.cfg),
            "attn": AttentionBridge(
                name="attn",
                config=self.cfg,
                submodules={
                    "q": LinearBridge(name="q"),
                    "k": LinearBridge(name="k"),
                    "v": LinearBridge(name="v"),
                    "o": LinearBridge(name="o"),
                },
            ),
        }
        if not cfg.attn_only:
            block_submodules["ln2"] = _norm_bridge("ln2", self.cfg)
            block_submodules["mlp"] = _mlp_bridge(self.cfg)
        blocks = BlockBridge(name="inner.blocks", config=self.cfg, submodules=block_submodules)
        if cfg.attn_only:  # no ln2/mlp to alias
            blocks.hook_aliases = {
                k: v for k, v in blocks.hook_aliases.items() if k not in ("hook_resid_mid", "hook_mlp_out")
            }
        mapping: dict[str, GeneralizedComponent] = {"embed": EmbeddingBridge(name="inner.embed")}
        if cfg.positional_embedding_type == "standard":
            mapping["pos_embed"] = PosEmbedBridge(name="inner.pos_embed")
        mapping["blocks"] = blocks
        mapping["ln_final"] = _norm_bridge("inner.ln_final", self.cfg)
        mapping["unembed"] = UnembeddingBridge(name="inner.unembed")
        self.component_mapping = mapping


class BridgeContainer(nn.Module):
    """Holds the model one level down (``inner``) so its TransformerLens-named attributes
    (``embed``, ``blocks``...) do not collide with the bridge's own slots, and adapts
    the bridge's HF-style call (``input_ids=``, ``attention_mask=``) to our forward."""

    def __init__(self, model: BilinearTransformer):
        super().__init__()
        self.inner = model

    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tensor:
        if input_ids is None:
            raise ValueError("BilinearTransformer bridges take token ids (input_ids), not embeddings")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # all-ones mask: keep the fused attention path
        return self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids)


def bridge_config(cfg: ModelConfig, default_prepend_bos: bool = True) -> TransformerBridgeConfig:
    """The ``TransformerBridgeConfig`` describing a model of config ``cfg`` (``default_prepend_bos``:
    the model's, False for tokenizers without BOS such as the paper's)."""
    tl_cfg = TransformerBridgeConfig(
        d_model=cfg.d_model,
        d_head=cfg.d_head,
        n_layers=cfg.n_layers,
        n_ctx=cfg.n_ctx,
        n_heads=cfg.n_heads,
        d_vocab=cfg.d_vocab,
        d_mlp=cfg.d_mlp,
        # TransformerLens act_fn names are the table's (read by the processed-weight path).
        act_fn="identity" if cfg.attn_only else mlp_kind_spec(cfg.mlp_kind).activation,
        normalization_type=cfg.normalization_type,
        positional_embedding_type=cfg.positional_embedding_type,
        rotary_base=int(cfg.rotary_base),
        eps=cfg.eps,
        attn_only=cfg.attn_only,
        gated_mlp=cfg.gated,
        architecture=ARCHITECTURE_NAME,
        default_prepend_bos=default_prepend_bos,
    )
    tl_cfg.bilinear_lens_mlp_kind = cfg.mlp_kind
    return tl_cfg


def _bridge_tokenizer(tokenizer: Any, prepend_bos: bool = True) -> Any:
    """A copy of ``tokenizer`` that TransformerBridge accepts as is.

    The bridge reloads tokenizers by ``name_or_path`` to add a BOS token unless they say
    they already handle it; ours is built from a ``tokenizer.json`` and has no hub name.
    BOS is prepended by the bridge's ``to_tokens`` (``default_prepend_bos``), exactly as
    :meth:`BilinearTransformer.to_tokens` does.
    """
    if tokenizer is None:
        return None
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.init_kwargs.setdefault("name_or_path", "bilinear-lens")
    tokenizer.init_kwargs["add_bos_token"] = prepend_bos
    return tokenizer


def to_bridge(model: BilinearTransformer, copy_model: bool = True, model_name: str = "bilinear-lens") -> TransformerBridge:
    """Wrap ``model`` in a TransformerLens ``TransformerBridge`` through our adapter.

    TransformerBridge replaces submodules of the model it wraps, so by default the bridge
    wraps a deep copy and ``model`` stays untouched (weights are then not shared). With
    ``copy_model=False`` the bridge wraps ``model`` itself, as TransformerLens does.
    """
    # Import for its side effect: the factory's entry-point discovery finds our adapter.
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    if not isinstance(model, BilinearTransformer):
        raise TypeError(f"to_bridge expects a BilinearTransformer, got {type(model).__name__}")
    inner = copy.deepcopy(model) if copy_model else model
    tokenizer = _bridge_tokenizer(inner.tokenizer, inner.default_prepend_bos)
    return build_bridge_from_module(
        BridgeContainer(inner),
        ARCHITECTURE_NAME,
        tl_config=bridge_config(model.cfg, default_prepend_bos=inner.default_prepend_bos),
        tokenizer=tokenizer,
        model_name=model_name,
    )


def load_bridge(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> TransformerBridge:
    """Load a checkpoint directory (``save_pretrained`` format) straight into a bridge."""
    return to_bridge(BilinearTransformer.from_pretrained(path, device=device), copy_model=False)


class HFGatedMLPBridge(BilinearMLPBridge):
    """:class:`BilinearMLPBridge`'s processed-weights path (``enable_compatibility_mode``) for
    a wrapped Hugging Face gated MLP: ``down(act_fn(gate x) * up x)`` with the module's own
    ``act_fn``.

    TransformerLens resolves the activation from the config's name and falls back to SiLU
    for names it does not know, among them ``"linear"`` (our bilinear export), so its
    processed path would silently compute SwiGLU. The default path runs the HF module
    itself and is unchanged.
    """

    def elementwise(self, pre: Tensor, pre_linear: Tensor) -> Tensor:
        return self.original_component.act_fn(pre) * pre_linear


def boot_export(path: Union[str, Path], device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                **kwargs: Any) -> TransformerBridge:
    """TransformerLens' ``TransformerBridge.boot_transformers(path)`` on an HF Llama export
    (``save_pretrained(format="hf")``), made safe for ``enable_compatibility_mode()``: every
    block's gated MLP bridge computes with the HF module's own activation
    (:class:`HFGatedMLPBridge`; the identity for ``hidden_act: "linear"``), where
    TransformerLens' would use SiLU. ``kwargs`` go to ``boot_transformers``.

    Raises ``ValueError`` naming the field if the booted model's MLPs are not the gated
    Hugging Face MLPs this fix is for (the bridge would otherwise be silently wrong).
    """
    bridge = TransformerBridge.boot_transformers(str(path), device=device, dtype=dtype, **kwargs)
    for index, block in enumerate(bridge.blocks):
        mlp = getattr(block, "mlp", None)
        if not isinstance(mlp, GatedMLPBridge) or not callable(getattr(mlp.original_component, "act_fn", None)):
            raise ValueError(f"boot_export({str(path)!r}): blocks.{index}.mlp is {type(mlp).__name__} without an act_fn; "
                             "expected the gated MLP of an HF Llama export (config.json model_type 'llama')")
        mlp.__class__ = HFGatedMLPBridge  # a subclass adding no state: only the processed forward differs
    return bridge
