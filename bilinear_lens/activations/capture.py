"""Activation capture: run a model and keep the activations at some hook points.

One function for every analysis that reads activations (ablation reference values,
patching sources, spline codes, eigen-readings): names are checked first (an unknown one
raises :class:`~bilinear_lens.models.hook_names.UnknownHookError` with close matches), and
the activations are keyed by the requested names, also on a ``TransformerBridge``, whose
cache reports an alias such as ``hook_pre`` under the name of the hook it points to.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

from bilinear_lens.models.hook_names import check_hook_names
from bilinear_lens.models.protocol import HookedModel

FwdHook = tuple[str, Callable[..., Any]]


def hook_name_list(names: Union[str, Sequence[str]], what: str = "names") -> list[str]:
    """``names`` as a list: a single string is one hook name (not its characters); anything
    but strings is a one-line ``TypeError`` naming ``what``."""
    if isinstance(names, str):
        return [names]
    if not isinstance(names, Iterable) or isinstance(names, Tensor):
        raise TypeError(f"{what} must be a hook name or a sequence of hook names, got {type(names).__name__}")
    out = list(names)
    for name in out:
        if not isinstance(name, str):
            raise TypeError(f"{what} must hold hook names (str), got {type(name).__name__} {name!r}")
    return out


@torch.no_grad()
def run_capturing(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"],
    names: Union[str, Sequence[str]],
    fwd_hooks: Sequence[FwdHook] = (),
    return_type: Any = None,
    **forward_kwargs: Any,
) -> tuple[Any, dict[str, Tensor]]:
    """``(output, {name: activation})``: one forward pass with ``fwd_hooks`` (they run
    before the capture on a shared hook point, so their edits are seen), activations
    detached. ``return_type`` and ``forward_kwargs`` (e.g. ``stop_at_layer``) go to the
    forward call. ``names`` is a hook name or a sequence of them."""
    names = hook_name_list(names)
    check_hook_names(model.hook_dict, names, where=type(model).__name__)
    captured: dict[str, Tensor] = {}

    def capture(name: str) -> Callable[..., None]:
        def hook(value: Tensor, hook: Any) -> None:
            captured[name] = value.detach()

        return hook

    hooks = [*fwd_hooks, *[(name, capture(name)) for name in names]]
    output = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=return_type, **forward_kwargs)
    return output, captured


def capture_activations(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"],
    names: Union[str, Sequence[str]],
    fwd_hooks: Sequence[FwdHook] = (),
    **forward_kwargs: Any,
) -> dict[str, Tensor]:
    """The activations at ``names`` (see :func:`run_capturing`), without the output."""
    return run_capturing(model, tokens, names, fwd_hooks, None, **forward_kwargs)[1]
