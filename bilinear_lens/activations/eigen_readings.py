"""Eigen-readings of a model's bilinear layer, checked on real activations through hooks.

The weight-only readings (:func:`~bilinear_lens.weights.layer_eigen.layer_eigendecomposition`,
:func:`~bilinear_lens.weights.layer_eigen.top_tokens_for_eigenvectors`) are in
:mod:`bilinear_lens.weights.layer_eigen`. This module checks them on a model's activations
(our :class:`~bilinear_lens.models.model.BilinearTransformer` or a TransformerLens
``TransformerBridge`` of it, anything with ``blocks[l].mlp`` and the hook
``blocks.{l}.mlp.hook_in``):

- :func:`eigenvector_activations_on_tokens`: ``lambda_i (v_i . x)^2`` for every token of a
  batch, where ``x`` is the MLP input cached at ``blocks.{l}.mlp.hook_in``.
- :func:`rank_k_correlation_on_tokens`: the paper's Figure 9 check: correlation over real
  tokens between the true ``u . MLP(x)`` and its rank-``k`` approximation.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from bilinear_lens.activations.capture import capture_activations
from bilinear_lens.models.hook_names import mlp_hook_name
from bilinear_lens.models.protocol import HookedModel
from bilinear_lens.weights.eigen import eigenvector_activations, low_rank_correlation
from bilinear_lens.weights.layer_eigen import LayerEigen


def mlp_inputs(model: HookedModel, tokens: Int[Tensor, "batch pos"], layer: int) -> Float[Tensor, "batch pos d_model"]:
    """The MLP input of ``layer`` (``blocks.{layer}.mlp.hook_in``) on ``tokens``."""
    name = mlp_hook_name(layer, "hook_in")
    return capture_activations(model, tokens, [name])[name]


def eigenvector_activations_on_tokens(
    model: HookedModel, tokens: Int[Tensor, "batch pos"], layer_eig: LayerEigen, k: Optional[int] = None
) -> Float[Tensor, "batch pos k"]:
    """``lambda_i (v_i . x)^2`` at every token (``x`` = the layer's MLP input, via hooks).

    Summed over all ``d_model`` components it equals ``u . MLP(x)`` exactly (no biases).
    """
    x = mlp_inputs(model, tokens, layer_eig.layer)
    return eigenvector_activations(layer_eig.eig, x.to(layer_eig.eigenvalues.dtype), k)


@torch.no_grad()
def rank_k_correlation_on_tokens(
    model: HookedModel, tokens: Int[Tensor, "batch pos"], layer_eig: LayerEigen, ks: Sequence[int] = (1, 2, 4, 8)
) -> dict[int, float]:
    """Pearson correlation over all tokens of ``tokens`` between ``u . MLP(x)`` (the true
    output, computed from the MLP on the hooked input) and ``sum_{i<k} lambda_i (v_i . x)^2``
    (:func:`~bilinear_lens.weights.eigen.low_rank_correlation` on the hooked inputs). A ``k`` beyond
    the components in ``layer_eig`` uses all of them."""
    x = mlp_inputs(model, tokens, layer_eig.layer).reshape(-1, layer_eig.direction.shape[0])
    mlp = model.blocks[layer_eig.layer].mlp
    usable = [min(int(k), layer_eig.eig.k) for k in ks]
    corr = low_rank_correlation(
        mlp, layer_eig.direction, x.to(layer_eig.eigenvalues.dtype), usable, eig=layer_eig.eig
    )
    return {int(k): float(c) for k, c in zip(ks, corr)}
