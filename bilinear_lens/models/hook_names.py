"""Hook names and layer indices: building (TransformerLens' ``get_act_name``) and checking,
shared by our model and analysis code that runs on bridges."""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping, Optional

from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import get_act_name

from bilinear_lens.models.protocol import HookedModel


class UnknownHookError(KeyError):
    """A hook name that the model does not have. The message lists close matches."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def check_hook_names(hook_dict: Mapping[str, Any], names: Iterable[str], where: str = "model") -> None:
    """Raise :class:`UnknownHookError` for the first name not in ``hook_dict``."""
    for name in names:
        if name not in hook_dict:
            close = difflib.get_close_matches(name, list(hook_dict), n=3, cutoff=0.6)
            hint = f"; did you mean {close}?" if close else ""
            raise UnknownHookError(
                f"unknown hook name {name!r} on {where}{hint} ({len(hook_dict)} hook points; "
                f"list them with `list(model.hook_dict)`)"
            )


class CheckedActivationCache(ActivationCache):
    """TransformerLens' ``ActivationCache`` whose lookups fail loudly: ``cache[key]`` with a
    name (or ``(name, layer[, layer_type])`` shorthand, as ``get_act_name`` takes it) that
    the model does not have raises :class:`UnknownHookError` with close matches; a layer
    index outside ``[-n_layers, n_layers)`` says so; a hook point of the model that
    ``names_filter`` left out says it was not cached. Everything else is TransformerLens'
    (methods, shorthand, negative layer indices)."""

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, str) and key in self.cache_dict:
            return self.cache_dict[key]
        name = self._resolve(key)
        if name in self.cache_dict:
            return self.cache_dict[name]
        hook_dict = getattr(self.model, "hook_dict", None)
        if isinstance(hook_dict, Mapping) and name in hook_dict:
            close = difflib.get_close_matches(name, list(self.cache_dict), n=3, cutoff=0.6)
            hint = f"; cached names close to it: {close}" if close else ""
            raise UnknownHookError(
                f"hook {name!r} (cache key {key!r}) is a hook point of the model but was not cached "
                f"(run_with_cache's names_filter left it out){hint}"
            )
        known = hook_dict if isinstance(hook_dict, Mapping) else self.cache_dict
        check_hook_names(known, [name], where=f"the ActivationCache (cache key {key!r})")
        raise UnknownHookError(f"hook {name!r} (cache key {key!r}) is not in the ActivationCache")  # pragma: no cover

    def _resolve(self, key: Any) -> str:
        """The full hook name ``key`` stands for (TransformerLens' rules); a malformed key or
        a layer out of range raises :class:`UnknownHookError` saying so."""
        if isinstance(key, str):
            return get_act_name(key)
        if not isinstance(key, tuple) or not key or not isinstance(key[0], str) or len(key) > 3:
            raise UnknownHookError(
                f"cache key {key!r} is invalid: give a hook name or (name, layer[, layer_type]), "
                "e.g. cache['blocks.0.hook_resid_post'] or cache['resid_post', 0]"
            )
        if len(key) > 1 and key[1] is not None:
            layer, n_layers = key[1], self.model.cfg.n_layers
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise UnknownHookError(f"cache key {key!r}: the layer must be an int, got {layer!r}")
            if not -n_layers <= layer < n_layers:
                raise UnknownHookError(
                    f"cache key {key!r}: layer {layer} is out of range: the model has {n_layers} layers "
                    f"[0, {n_layers}) (negative indices count from the end)"
                )
            key = (key[0], layer % n_layers, *key[2:])
        return get_act_name(*key)


def mlp_hook_name(layer: int, hook: str) -> str:
    """``blocks.{layer}.mlp.{hook}`` for an MLP hook point (``"hook_post"`` or ``"post"``),
    built by TransformerLens' ``get_act_name``."""
    return get_act_name(hook.removeprefix("hook_"), layer, "mlp")


def check_layer(model: HookedModel, layer: Any) -> int:
    """``layer``, checked to be a block index of ``model`` (``ValueError`` naming the value
    and the range otherwise; a string or bool is not an index)."""
    n_layers = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"layer must be an int block index in [0, {n_layers}), got {layer!r}")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {n_layers} layers [0, {n_layers})")
    return layer


def check_mlp_layer(model: HookedModel, layer: Any) -> int:
    """:func:`check_layer`, and the block must have an MLP (``blocks.{layer}.mlp.hook_in``)."""
    check_layer(model, layer)
    name = mlp_hook_name(layer, "hook_in")
    if name not in model.hook_dict:
        raise ValueError(f"layer {layer} has no MLP (no hook {name!r}; attention-only model?)")
    return layer


# Hugging Face Llama module names (the hook names SAELens uses on an ``AutoModelForCausalLM``:
# a module's output, the first element of a tuple) -> ours, where the two tensors are equal on
# our HF export (hf_llama's name map). ``{l}`` is the layer; ``"bilinear"`` entries hold only
# when the MLP's activation is the identity; ``"RMSPre"`` only with weight-ones norms.
_HF_EXACT = {
    "model.embed_tokens": ("hook_embed", None),
    "model.layers.{l}": ("blocks.{l}.hook_resid_post", None),
    "model.layers.{l}.self_attn": ("blocks.{l}.hook_attn_out", None),
    "model.layers.{l}.self_attn.o_proj": ("blocks.{l}.hook_attn_out", None),
    "model.layers.{l}.post_attention_layernorm": ("blocks.{l}.mlp.hook_in", None),
    "model.layers.{l}.mlp": ("blocks.{l}.hook_mlp_out", None),
    "model.layers.{l}.mlp.down_proj": ("blocks.{l}.hook_mlp_out", None),
    "model.layers.{l}.mlp.gate_proj": ("blocks.{l}.mlp.hook_pre", None),
    "model.layers.{l}.mlp.up_proj": ("blocks.{l}.mlp.hook_pre_linear", None),
    "model.layers.{l}.mlp.act_fn": ("blocks.{l}.mlp.hook_pre", "bilinear"),
    "model.layers.{l}.input_layernorm": ("blocks.{l}.ln1.hook_normalized", "RMSPre"),
    "model.norm": ("ln_final.hook_normalized", "RMSPre"),
}
# HF names with no equal tensor here, and what to use instead
_HF_NEAREST = {
    "model.layers.{l}.self_attn.q_proj": "blocks.{l}.attn.hook_q reshaped to [batch, pos, n_heads * d_head]",
    "model.layers.{l}.self_attn.k_proj": "blocks.{l}.attn.hook_k reshaped to [batch, pos, n_heads * d_head]",
    "model.layers.{l}.self_attn.v_proj": "blocks.{l}.attn.hook_v reshaped to [batch, pos, n_heads * d_head]",
    "model.layers.{l}.mlp.act_fn": "act(blocks.{l}.mlp.hook_pre) (hook_post is act(pre) * pre_linear)",
    "model.layers.{l}.input_layernorm": "blocks.{l}.ln1.hook_normalized times blocks.{l}.ln1.weight",
    "model.norm": "ln_final.hook_normalized times ln_final.weight",
    "lm_head": "the logits (no hook)",
}


def _hf_pattern(name: str) -> tuple[str, Optional[int]]:
    """``name`` with its layer index replaced by ``{l}`` (``model.layers.3.mlp`` -> ..., 3)."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return ".".join(["model", "layers", "{l}", *parts[3:]]), int(parts[2])
    return name, None


def hf_hook_equivalent(name: str, model: Any) -> tuple[Optional[str], Optional[str]]:
    """``(ours, None)`` when the HF Llama module name ``name`` has an exactly equal hook on
    ``model`` (same tensor on our HF export), else ``(None, advice)`` naming the nearest
    thing, or ``(None, None)`` when ``name`` is not an HF Llama module name at all."""
    pattern, layer = _hf_pattern(name)
    fill = lambda text: text.replace("{l}", str(layer))  # noqa: E731
    exact = _HF_EXACT.get(pattern)
    if exact is not None:
        ours, condition = exact
        cfg = getattr(model, "cfg", None)
        holds = (condition is None
                 or (condition == "bilinear" and getattr(cfg, "mlp_kind", None) == "bilinear")
                 or (condition == "RMSPre" and getattr(cfg, "normalization_type", None) == "RMSPre"))
        if holds and fill(ours) in model.hook_dict:
            return fill(ours), None
    if pattern in _HF_NEAREST:
        return None, f"no hook here equals it; the nearest is {fill(_HF_NEAREST[pattern])}"
    if exact is not None:
        return None, f"its equivalent {fill(exact[0])} is not a hook of this model"
    return None, None
