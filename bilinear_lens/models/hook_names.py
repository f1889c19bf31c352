"""Hook names and layer indices: building (TransformerLens' ``get_act_name``) and checking,
shared by our model and analysis code that runs on bridges."""

from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping

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
