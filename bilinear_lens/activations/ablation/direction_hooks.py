"""Residual-direction ablation: edit an activation's component along one direction."""

from __future__ import annotations

from typing import Any, Optional

from jaxtyping import Float, Int
from torch import Tensor

from bilinear_lens.activations.ablation.install import FwdHook, context_manager_form
from bilinear_lens.activations.ablation.values import replacement
from bilinear_lens.models.hook_names import check_hook_names
from bilinear_lens.models.protocol import HookedModel


def checked_direction(direction: Tensor, d_model: int, name: str = "direction") -> Float[Tensor, "d_model"]:
    """``direction`` detached, checked to be a finite nonzero ``[d_model]`` vector."""
    if not isinstance(direction, Tensor) or direction.shape != (d_model,):
        shape = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction).__name__
        raise ValueError(f"{name} must be a tensor of shape ({d_model},) (d_model), got {shape}")
    direction = direction.detach()
    norm = direction.norm()
    if not bool(norm.isfinite()) or norm == 0:
        raise ValueError(f"{name} must be finite and nonzero")
    return direction


def direction_ablation_hook(
    model: HookedModel,
    hook_name: str,
    direction: Float[Tensor, "d_model"],
    method: str = "zero",
    reference: Optional[Int[Tensor, "ref_batch ref_pos"]] = None,
    seed: int = 0,
) -> FwdHook:
    """``(hook_name, fn)`` ablating the component of a ``[..., d_model]`` activation along
    ``direction`` (e.g. at ``blocks.1.hook_resid_pre``): with ``d = direction / |direction|``,
    ``x <- x - (x . d - c) d`` where ``c`` is 0 (``"zero"``: project ``d`` out), the mean of
    ``x . d`` over ``reference`` (``"mean"``) or a resampled reference component.

    On a ``TransformerBridge``, ``blocks.{l}.hook_resid_mid`` aliases ``ln2.hook_in``: an
    edit there reaches the MLP's input but not the residual stream's skip path (on our
    model it reaches both). ``hook_resid_pre``/``hook_resid_post`` behave the same on both.
    """
    check_hook_names(model.hook_dict, [hook_name], where=type(model).__name__)
    direction = checked_direction(direction, model.cfg.d_model)
    unit = direction / direction.norm()
    values = replacement(model, hook_name, method, reference, seed, read=lambda act: (act @ unit.to(act))[..., None])

    def ablate(activation: Float[Tensor, "... d_model"], hook: Any) -> Tensor:
        u = unit.to(activation)
        component = (activation @ u)[..., None]  # [..., 1]: the ablated quantity, as in `read`
        target = values.values(component.shape, activation.dtype, activation.device)
        return activation - (component - target) * u

    return hook_name, ablate


ablate_direction = context_manager_form(
    direction_ablation_hook,
    "ablate_direction",
    """Context manager form of :func:`direction_ablation_hook`.""",
)
