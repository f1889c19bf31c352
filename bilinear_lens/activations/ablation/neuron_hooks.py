"""Neuron ablation: set chosen MLP neurons of one layer to their replacement values."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from bilinear_lens.activations.ablation.install import FwdHook, HookFn, context_manager_form
from bilinear_lens.activations.ablation.values import Replacement, replacement
from bilinear_lens.models.hook_names import check_hook_names, check_mlp_layer, mlp_hook_name
from bilinear_lens.models.protocol import HookedModel

NEURON_HOOKS = ("hook_post", "hook_pre", "hook_pre_linear")
NeuronsLike = Union[int, Sequence[int], Tensor]


def neuron_hook_name(model: HookedModel, layer: int, hook: str) -> str:
    """``blocks.{layer}.mlp.{hook}``, checked against the model's hook points."""
    check_mlp_layer(model, layer)
    if hook not in NEURON_HOOKS:
        raise ValueError(f"hook must be one of {NEURON_HOOKS} (an MLP neuron hook), got {hook!r}")
    name = mlp_hook_name(layer, hook)
    check_hook_names(model.hook_dict, [name], where=type(model).__name__)
    return name


def _index_list(neurons: NeuronsLike) -> list[int]:
    """``neurons`` (an int, ints, or an integer tensor) as a list of Python ints."""
    if isinstance(neurons, Tensor):
        if neurons.is_floating_point() or neurons.is_complex():
            raise TypeError(f"neuron indices must be integers, got a {neurons.dtype} tensor")
        return [int(n) for n in neurons.flatten().tolist()]
    if isinstance(neurons, int) and not isinstance(neurons, bool):
        return [neurons]
    values = list(neurons)
    for n in values:
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"neuron indices must be ints, got {n!r} ({type(n).__name__})")
    return values


def neuron_indices(neurons: NeuronsLike, d_mlp: int) -> Int[Tensor, "n"]:
    """Sorted unique neuron indices (duplicates allowed in the input), range-checked; a
    boolean mask ``[d_mlp]`` selects where it is true."""
    if isinstance(neurons, Tensor) and neurons.dtype == torch.bool:
        if neurons.shape != (d_mlp,):
            raise ValueError(f"a boolean neuron mask must have shape ({d_mlp},), got {tuple(neurons.shape)}")
        neurons = neurons.nonzero().flatten()
    values = _index_list(neurons)
    bad = [n for n in values if not 0 <= n < d_mlp]
    if bad:
        raise ValueError(f"neuron indices {bad[:5]} out of range [0, {d_mlp}) (d_mlp={d_mlp})")
    return torch.tensor(sorted(set(values)), dtype=torch.long)


def select_neurons_hook(mask: Tensor, values: Replacement) -> HookFn:
    """Hook setting the neurons where ``mask [d_mlp]`` is true to ``values`` (out of place)."""

    def ablate(activation: Float[Tensor, "batch pos d_mlp"], hook: Any) -> Tensor:
        if activation.shape[-1] != mask.shape[0]:
            raise ValueError(f"{hook.name}: expected last dim {mask.shape[0]} (d_mlp), got {tuple(activation.shape)}")
        new = values.values(activation.shape, activation.dtype, activation.device)
        return torch.where(mask.to(activation.device), new, activation)

    return ablate


def neuron_ablation_hook(
    model: HookedModel,
    layer: int,
    neurons: NeuronsLike,
    hook: str = "hook_post",
    method: str = "zero",
    reference: Optional[Int[Tensor, "ref_batch ref_pos"]] = None,
    seed: int = 0,
) -> FwdHook:
    """``(hook_name, fn)`` ablating ``neurons`` of layer ``layer``'s MLP at ``hook``.

    Args:
        model: a TransformerLens model (our model or a ``TransformerBridge``).
        layer: block index.
        neurons: an index, indices (duplicates are fine) or a boolean mask ``[d_mlp]``.
        hook: ``"hook_post"`` (the neuron's output), ``"hook_pre"`` or ``"hook_pre_linear"``
            (gated MLPs only).
        method: ``"zero"``, ``"mean"`` or ``"resample"`` (see
            :mod:`bilinear_lens.activations.ablation.values`).
        reference: ``[batch, pos]`` tokens whose activations ``mean``/``resample`` use;
            captured once, here.
        seed: seed of the ``resample`` draw.
    """
    name = neuron_hook_name(model, layer, hook)
    d_mlp = model.cfg.d_mlp
    mask = torch.zeros(d_mlp, dtype=torch.bool)
    mask[neuron_indices(neurons, d_mlp)] = True
    return name, select_neurons_hook(mask, replacement(model, name, method, reference, seed))


ablate_neurons = context_manager_form(
    neuron_ablation_hook,
    "ablate_neurons",
    """Context manager: every forward pass inside runs with ``neurons`` ablated
(arguments as in :func:`neuron_ablation_hook`).""",
)
