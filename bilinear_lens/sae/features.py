"""Input SAE features as the basis of a bilinear layer's interaction matrix.

Pearce et al. (2024, §5) read ``Q(u)`` for an output feature ``u`` in the basis of
*input* SAE features: with ``D_in`` the input SAE's decoder rows as the MLP sees them
(``[d_sae, d_model]``, :func:`input_feature_basis`), the feature-interaction matrix

    M = D_in Q(u) D_in^T,   M[i, j] = f_i^T Q(u) f_j

says how input features ``i`` and ``j`` present together drive ``u . MLP(x)`` (the
diagonal: a feature's own effect). :func:`feature_interaction_matrix` returns ``M``
restricted to the input features that interact most (largest row norm of the full ``M``);
:func:`eigenvector_input_features` names each eigenvector of ``Q(u)`` by the input features
it is most aligned with (cosine, both poles, as tokens are named in
:func:`~bilinear_lens.weights.layer_eigen.top_tokens_for_eigenvectors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from bilinear_lens.weights.layer_eigen import LayerEigen, bilinear_layer
from bilinear_lens.weights.directions import DirectionLike, is_residual_hook, resolve_direction
from bilinear_lens.weights.tensor import interaction_matrix

ROW_CHUNK = 1024  # rows of M formed at once when ranking features (memory: ROW_CHUNK * d_sae)


@torch.no_grad()
def input_feature_basis(model: Any, layer: int, sae: Any) -> Float[Tensor, "d_sae d_model"]:
    """The input SAE's decoder rows in the coordinates of layer ``layer``'s MLP input.

    An SAE on ``blocks.{layer}.mlp.hook_in`` or ``blocks.{layer}.ln2.hook_normalized`` already
    lives there: its rows are used as they are. An SAE on the residual stream (e.g.
    ``blocks.{layer}.hook_resid_mid``, the paper's choice) is mapped through the layer's
    ``ln2`` row by row: ``f_i = ln2(W_dec[i])``, the MLP input when the residual holds the
    feature alone (as :func:`~bilinear_lens.weights.layer_eigen.normalized_embeddings`
    does for tokens). Other hooks are refused.
    """
    bilinear_layer(model, layer)
    hook = sae.cfg.hook_name
    if sae.cfg.d_in != model.cfg.d_model:
        raise ValueError(f"the input SAE on {hook} has d_in={sae.cfg.d_in}, but the model's d_model is {model.cfg.d_model}")
    rows = sae.W_dec.detach()
    if hook in (f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.ln2.hook_normalized"):
        return rows
    if is_residual_hook(hook):
        return model.blocks[layer].ln2(rows.to(model.W_E.dtype))
    raise ValueError(
        f"an input SAE on {hook!r} cannot be a basis for layer {layer}'s MLP input; use one on the residual "
        f"stream or on blocks.{layer}.mlp.hook_in"
    )


@dataclass
class FeatureInteractions:
    """``matrix[a, b] = f_{i_a}^T Q(u) f_{i_b}`` for the input features ``indices``
    (ordered by ``scores``, the row norms of the full ``D_in Q(u) D_in^T``)."""

    indices: Int[Tensor, "n"]
    scores: Float[Tensor, "n"]
    matrix: Float[Tensor, "n n"]


@torch.no_grad()
def feature_interaction_matrix(
    model: Any, layer: int, direction: DirectionLike, sae_in: Any, n_features: Optional[int] = 32
) -> FeatureInteractions:
    """``D_in Q(u) D_in^T`` restricted to the ``n_features`` input features with the largest
    row norm ``|M[i, :]|`` (all of them for ``None``); see module docstring."""
    mlp = bilinear_layer(model, layer)
    u = resolve_direction(model, direction).to(mlp.W_in.dtype)
    F = input_feature_basis(model, layer, sae_in).to(mlp.W_in.dtype)
    n_total = F.shape[0]
    n = n_total if n_features is None else n_features
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= n_total:
        raise ValueError(f"n_features must be in [1, {n_total}] (the input SAE's d_sae), got {n_features!r}")
    QF = interaction_matrix(mlp, u) @ F.T  # [d_model, d_sae]
    scores = torch.cat([(F[i : i + ROW_CHUNK] @ QF).norm(dim=-1) for i in range(0, n_total, ROW_CHUNK)])
    top = scores.topk(n)
    return FeatureInteractions(top.indices, top.values, F[top.indices] @ QF[:, top.indices])


@dataclass
class EigenvectorFeatures:
    """Input features most aligned with one eigenvector: indices and cosines ``cos(v, f_i)``
    at the positive and the negative pole."""

    index: int
    eigenvalue: float
    positive_features: list[int]
    positive_cosines: list[float]
    negative_features: list[int]
    negative_cosines: list[float]


@torch.no_grad()
def eigenvector_input_features(
    model: Any, layer_eig: LayerEigen, sae_in: Any, n_vectors: int = 5, n_features: int = 8
) -> list[EigenvectorFeatures]:
    """For the top ``n_vectors`` eigenvectors of ``layer_eig``, the ``n_features`` input
    features with the largest and smallest cosine ``v_i . f / |f|`` (``f`` from
    :func:`input_feature_basis`). Since an eigen-component is ``lambda (v . x)^2``, both
    poles drive it alike."""
    F = input_feature_basis(model, layer_eig.layer, sae_in).to(layer_eig.eigenvalues.dtype)
    for name, value, limit in (("n_vectors", n_vectors, layer_eig.eig.k), ("n_features", n_features, F.shape[0])):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise ValueError(f"{name} must be in [1, {limit}], got {value!r}")
    unit = F / F.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(F.dtype).tiny)
    cosines = unit @ layer_eig.eigenvectors[:, :n_vectors]  # [d_sae, n_vectors]
    out = []
    for j in range(n_vectors):
        pos, neg = cosines[:, j].topk(n_features), (-cosines[:, j]).topk(n_features)
        out.append(EigenvectorFeatures(
            index=j, eigenvalue=float(layer_eig.eigenvalues[j]),
            positive_features=pos.indices.tolist(), positive_cosines=pos.values.tolist(),
            negative_features=neg.indices.tolist(), negative_cosines=(-neg.values).tolist(),
        ))
    return out
