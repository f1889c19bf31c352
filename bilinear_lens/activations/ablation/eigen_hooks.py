"""Eigen-component ablation of a bilinear layer: keep or remove components of ``Q(u)``."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.utilities import get_act_name

from bilinear_lens.activations.ablation.direction_hooks import checked_direction
from bilinear_lens.activations.ablation.install import FwdHook, context_manager_form
from bilinear_lens.models.hook_names import check_hook_names, check_mlp_layer, mlp_hook_name
from bilinear_lens.models.protocol import HookedModel
from bilinear_lens.weights.eigen import Eigendecomposition, eigendecompose
from bilinear_lens.weights.tensor import BilinearWeights, interaction_matrix

# The layer-output hooks an eigen edit may sit on, and their get_act_name arguments.
MLP_OUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
_OUT_HOOK_ACT_NAMES: dict[str, tuple[str, Optional[str]]] = {"hook_mlp_out": ("mlp_out", None), "mlp.hook_out": ("out", "mlp")}


def bilinear_weights(model: HookedModel, layer: int) -> BilinearWeights:
    """The layer's weights, refusing anything but a bilinear MLP without biases (where
    ``u . MLP(x) = x^T Q(u) x`` holds exactly)."""
    check_mlp_layer(model, layer)
    mlp = model.blocks[layer].mlp
    why = "eigen-component ablation needs a bilinear MLP without biases"
    try:
        weights = BilinearWeights.from_module(mlp)
    except ValueError as err:
        raise ValueError(f"{why}; layer {layer}: {err}") from None
    with_bias = [name for name in ("b_in", "b_gate", "b_out") if getattr(weights, name) is not None]
    if with_bias:
        raise ValueError(f"{why}; layer {layer} has {', '.join(with_bias)} (built with mlp_bias=True)")
    return weights


def kept_components(d: int, keep: Union[None, int, Sequence[int]], remove: Optional[Sequence[int]]) -> Tensor:
    """Indices (into the |lambda|-sorted eigenpairs) of the components the approximation keeps."""
    if (keep is None) == (remove is None):
        raise ValueError("pass exactly one of keep (an int k for the top-k, or indices) and remove (indices)")
    if isinstance(keep, int) and not isinstance(keep, bool):
        if not 0 <= keep <= d:
            raise ValueError(f"keep={keep}: k must be in [0, {d}]")
        return torch.arange(keep)
    chosen = keep if keep is not None else remove
    assert chosen is not None
    indices = [int(i) for i in (chosen.tolist() if isinstance(chosen, Tensor) else chosen)]
    bad = [i for i in indices if not 0 <= i < d]
    if bad:
        raise ValueError(f"component indices {bad[:5]} out of range [0, {d})")
    if keep is not None:
        return torch.tensor(sorted(set(indices)), dtype=torch.long)
    removed = set(indices)
    return torch.tensor([i for i in range(d) if i not in removed], dtype=torch.long)


def _hook_names(model: HookedModel, layer: int, out_hook: str) -> tuple[str, str]:
    """(MLP input hook, layer output hook) of ``layer``, checked."""
    if out_hook not in MLP_OUT_HOOKS:
        raise ValueError(f"out_hook must be one of {MLP_OUT_HOOKS}, got {out_hook!r}")
    name, layer_type = _OUT_HOOK_ACT_NAMES[out_hook]
    in_name, out_name = mlp_hook_name(layer, "hook_in"), get_act_name(name, layer, layer_type)
    check_hook_names(model.hook_dict, [in_name, out_name], where=type(model).__name__)
    return in_name, out_name


def eigen_ablation_hooks(
    model: HookedModel,
    layer: int,
    u: Float[Tensor, "d_model"],
    keep: Union[None, int, Sequence[int]] = None,
    remove: Optional[Sequence[int]] = None,
    out_hook: str = "hook_mlp_out",
    eig: Optional[Eigendecomposition] = None,
) -> list[FwdHook]:
    """Hooks replacing a bilinear layer's output along ``u`` by a subset of its eigen-components.

    With ``Q(u) = sum_i lambda_i v_i v_i^T`` (sorted by ``|lambda|``, see
    :func:`~bilinear_lens.weights.eigen.eigendecompose`), the layer output ``y`` is edited as
    ``y - (u . y - approx(x)) u / |u|^2`` with ``approx(x) = sum_{i in kept} lambda_i (v_i . x)^2``
    and ``x`` the MLP input. Only the component along ``u`` changes. ``keep=k`` keeps the
    top-``k`` (rank-``k`` approximation), ``keep=[i, ...]`` those components and
    ``remove=[i, ...]`` all but those. Keeping all ``d_model`` changes nothing (up to float
    rounding); ``keep=0`` removes the ``u`` component exactly.

    Returns two hooks: one capturing ``x`` at ``blocks.{layer}.mlp.hook_in`` and one editing
    ``y`` at ``blocks.{layer}.{out_hook}`` (``"hook_mlp_out"`` or ``"mlp.hook_out"``), which
    fires later in the same forward pass. ``eig`` reuses a decomposition of ``Q(u)`` already
    computed (component indices then refer to it).
    """
    weights = bilinear_weights(model, layer)
    in_name, out_name = _hook_names(model, layer, out_hook)
    u = checked_direction(u, weights.d_model, name="u").to(dtype=weights.dtype, device=weights.device)
    eig = _decomposition(weights, u, eig)
    kept = kept_components(eig.k, keep, remove).to(eig.eigenvalues.device)
    values, vectors = eig.eigenvalues[kept], eig.eigenvectors[:, kept]
    captured: dict[str, Tensor] = {}

    def capture_input(x: Float[Tensor, "batch pos d_model"], hook: Any) -> None:
        captured["x"] = x.detach()

    def replace_component(y: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        if "x" not in captured:
            raise RuntimeError(f"{in_name} did not fire before {out_name} in this forward pass")
        x = captured.pop("x").to(y.dtype)
        approx = (x @ vectors.to(y)).pow(2) @ values.to(y)
        uu = u.to(y)
        return y - ((y @ uu) - approx)[..., None] * (uu / (uu @ uu))

    return [(in_name, capture_input), (out_name, replace_component)]


def _decomposition(weights: BilinearWeights, u: Tensor, eig: Optional[Eigendecomposition]) -> Eigendecomposition:
    """``eig`` checked to decompose one ``[d_model, d_model]`` matrix, or that of ``Q(u)``."""
    d = weights.d_model
    if eig is None:
        eig = eigendecompose(interaction_matrix(weights, u))
    if eig.eigenvectors.shape != (d, eig.k):
        raise ValueError(f"eig must decompose one [{d}, {d}] matrix, has eigenvectors {tuple(eig.eigenvectors.shape)}")
    return eig


ablate_eigencomponents = context_manager_form(
    eigen_ablation_hooks,
    "ablate_eigencomponents",
    """Context manager form of :func:`eigen_ablation_hooks`.""",
)
