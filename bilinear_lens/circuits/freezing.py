"""Freezing hooks: attention patterns and norm scales held at their values in one forward.

With every ``blocks.{l}.attn.hook_pattern`` and every norm's ``hook_scale`` replaced by
constants, attention is linear in the residual stream (``z = A v`` with ``A`` fixed) and
each norm is linear (``(x - [mean]) / s`` with ``s`` fixed), so the only nonlinearity left
in a bilinear transformer is its MLPs, each a quadratic form. The model is then a
polynomial in any upstream activation (degree ``2^n`` through ``n`` bilinear MLPs), which
is what makes attribution patching's path rules exact and attribution graphs additive.
It is exact for the frozen forward, not for counterfactuals through the softmax or the
norms.

The replacement values are detached, so no gradient flows through a frozen pattern or
scale. Used by :mod:`bilinear_lens.circuits.attribution_patching` and reusable by any
caller: ``model.hooks(fwd_hooks=freeze_hooks(model, cache))``. The linearized model
(:mod:`bilinear_lens.circuits.linearized`, under the attribution graph) records and
replaces the same :func:`frozen_hook_names` with the same :func:`constant_hook`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import Tensor

FwdHook = tuple[str, Callable[..., Tensor]]


def frozen_hook_names(model: Any, patterns: bool = True, norm_scales: bool = True) -> list[str]:
    """The hook points :func:`freeze_hooks` replaces on ``model`` (our model or its bridge):
    ``blocks.{l}.attn.hook_pattern`` and ``blocks.{l}.ln1/ln2.hook_scale`` and
    ``ln_final.hook_scale`` where they exist (a model without norms has no scales)."""
    names = []
    for layer in range(model.cfg.n_layers):
        if patterns:
            names.append(f"blocks.{layer}.attn.hook_pattern")
        if norm_scales:
            names += [f"blocks.{layer}.{ln}.hook_scale" for ln in ("ln1", "ln2")]
    if norm_scales:
        names.append("ln_final.hook_scale")
    return [name for name in names if name in model.hook_dict]


def constant_hook(name: str, value: Tensor) -> Callable[..., Tensor]:
    """Replace the activation by ``value`` (``[batch, ...]``), tiled along the batch axis
    when the forward stacks ``k`` copies of that batch (``[k * batch, ...]``, copy-major:
    rows ``c * batch + b``, the layout of the batched patching grids)."""
    value = value.detach()

    def replace(activation: Tensor, hook: Any) -> Tensor:
        rows, batch = activation.shape[0], value.shape[0]
        if rows % batch or activation.shape[1:] != value.shape[1:]:
            raise ValueError(
                f"cannot freeze {name}: the forward has shape {tuple(activation.shape)}, the cached value "
                f"{tuple(value.shape)} (its batch must divide the forward's)"
            )
        tiled = value if rows == batch else value.repeat(rows // batch, *([1] * (value.dim() - 1)))
        return tiled.to(activation.dtype)

    return replace


def freeze_hooks(
    model: Any, cache: Mapping[str, Tensor], patterns: bool = True, norm_scales: bool = True
) -> list[FwdHook]:
    """Forward hooks ``(name, fn)`` replacing attention patterns (``patterns``) and norm
    scales (``norm_scales``) by their values in ``cache`` (an ``ActivationCache`` or dict
    from ``run_with_cache`` on the run to freeze at), detached.

    ``cache[name]`` is ``[batch, head, q, k]`` for a pattern and ``[batch, pos, 1]`` for a
    scale; a forward over ``k`` stacked copies of that batch reuses it for each copy. A
    name missing from ``cache`` raises ``KeyError`` naming it.
    """
    hooks = []
    for name in frozen_hook_names(model, patterns, norm_scales):
        try:
            value = cache[name]
        except KeyError:
            raise KeyError(f"freeze_hooks: the cache has no {name!r}; cache the run with every hook (no names_filter)") from None
        hooks.append((name, constant_hook(name, value)))
    return hooks
