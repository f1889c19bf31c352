"""Eigen-readings of a model's bilinear layer, checked on real activations through hooks.

:mod:`bilinear_lens.weights.eigen` works on weights alone. This module connects it to a model
(our :class:`~bilinear_lens.models.model.BilinearTransformer` or a TransformerLens
``TransformerBridge`` of it, anything with ``blocks[l].mlp`` and the hook
``blocks.{l}.mlp.hook_in``):

- :func:`layer_eigendecomposition`: ``Q(u)`` of layer ``l`` for an output direction (a
  token, a ``(token_a, token_b)`` logit difference, or a vector; see
  :mod:`bilinear_lens.weights.directions`), exact or matrix-free.
- :func:`eigenvector_activations_on_tokens`: ``lambda_i (v_i . x)^2`` for every token of a
  batch, where ``x`` is the MLP input cached at ``blocks.{l}.mlp.hook_in``.
- :func:`rank_k_correlation_on_tokens`: the paper's Figure 9 check: correlation over real
  tokens between the true ``u . MLP(x)`` and its rank-``k`` approximation.
- :func:`top_tokens_for_eigenvectors`: for the first layer, the vocabulary tokens whose
  (normalised) embeddings align most with each eigenvector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from bilinear_lens.weights.directions import resolve_direction
from bilinear_lens.weights.eigen import (
    Eigendecomposition,
    eigendecompose,
    eigenvector_activations,
    low_rank_correlation,
    top_eigenvectors,
)
from bilinear_lens.activations.capture import capture_activations
from bilinear_lens.models.hook_names import check_layer, mlp_hook_name
from bilinear_lens.models.mlp_kinds import MLP_KINDS, model_mlp_kind
from bilinear_lens.weights.tensor import interaction_matrix
from bilinear_lens.models.protocol import HookedModel

DirectionSpec = Union[int, str, tuple, Tensor]


def bilinear_layer(model: HookedModel, layer: int) -> Any:
    """``model.blocks[layer].mlp``, checked to be a bilinear MLP."""
    check_layer(model, layer)
    kind = model_mlp_kind(model)
    if kind not in MLP_KINDS or not MLP_KINDS[kind].is_bilinear:
        raise ValueError(
            f"layer {layer} has a {kind!r} MLP; interaction matrices need a bilinear MLP (mlp_kind='bilinear')"
        )
    return model.blocks[layer].mlp


@dataclass
class LayerEigen:
    """The eigendecomposition of ``Q(u)`` for layer ``layer`` and direction ``u``."""

    layer: int
    direction: Float[Tensor, "d_model"]
    eig: Eigendecomposition

    @property
    def eigenvalues(self) -> Tensor:
        return self.eig.eigenvalues

    @property
    def eigenvectors(self) -> Tensor:
        return self.eig.eigenvectors


@torch.no_grad()
def layer_eigendecomposition(
    model: HookedModel, layer: int, direction: DirectionSpec, k: Optional[int] = None, method: str = "dense"
) -> LayerEigen:
    """Eigendecompose ``Q(u)`` of layer ``layer`` for ``direction`` (see module docstring).

    ``method="dense"`` forms ``Q`` and runs ``eigh`` (all components, or the top ``k``);
    ``"auto"``/``"lanczos"``/``"block"`` find the top ``k`` (see
    :func:`~bilinear_lens.weights.eigen.top_eigenvectors`; matrix-free for wide layers).
    """
    mlp = bilinear_layer(model, layer)
    u = resolve_direction(model, direction).to(mlp.W_in.dtype)
    if method == "dense":
        eig = eigendecompose(interaction_matrix(mlp, u))
        eig = eig if k is None else eig.top(k)
    else:
        eig = top_eigenvectors(mlp, u, k=k or 8, method=method)
    return LayerEigen(layer, u, eig)


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


@dataclass
class EigenvectorTokens:
    """Top aligned input tokens of one eigenvector (ids, strings, and scores ``v . e_t``)."""

    index: int
    eigenvalue: float
    positive_ids: list[int]
    positive_scores: list[float]
    negative_ids: list[int]
    negative_scores: list[float]
    positive_tokens: list[str]
    negative_tokens: list[str]


@torch.no_grad()
def normalized_embeddings(model: HookedModel, layer: int = 0) -> Float[Tensor, "d_vocab d_model"]:
    """Token embeddings as the layer's MLP sees them when attention is ignored:
    ``ln2(W_E[t] (+ W_pos mean))`` -- the direct path from the embedding, exact for a
    token attending only to itself in layer 0 up to the attention output."""
    emb = model.W_E.detach()
    if getattr(model, "W_pos", None) is not None:
        emb = emb + model.W_pos.detach().mean(0)
    return model.blocks[layer].ln2(emb)


def readable_token_mask(model: HookedModel) -> Tensor:
    """``[d_vocab]`` bool: tokens that decode to printable text. Byte-level BPE keeps pieces
    of multi-byte characters (decoding to U+FFFD) and control bytes that a plain-English
    corpus never uses; their embeddings stay near their random init and would otherwise
    crowd the extremes of every eigenvector."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return torch.ones(model.cfg.d_vocab, dtype=torch.bool)
    names = [tokenizer.decode([i]) for i in range(model.cfg.d_vocab)]
    return torch.tensor([bool(n) and "\ufffd" not in n and n.isprintable() for n in names])


@torch.no_grad()
def top_tokens_for_eigenvectors(
    model: HookedModel,
    layer_eig: LayerEigen,
    n_vectors: int = 5,
    n_tokens: int = 10,
    token_mask: Optional[Tensor] = None,
) -> list[EigenvectorTokens]:
    """For the top ``n_vectors`` eigenvectors, the ``n_tokens`` vocabulary tokens whose
    normalised embeddings (:func:`normalized_embeddings`) have the largest positive and
    negative projection ``v_i . e_t``. Eigenvectors have a sign ambiguity; since the
    activation is ``lambda (v . x)^2``, both ends of ``v`` activate it equally: the two
    lists are the two poles (e.g. "happy" vs "sad"). Meaningful for the first layer,
    where the MLP input is close to the token's own embedding. ``token_mask`` (``[d_vocab]``
    bool) limits the candidates; by default :func:`readable_token_mask`. ``n_vectors`` and
    ``n_tokens`` below 1 are a ``ValueError``."""
    for name_, value in (("n_vectors", n_vectors), ("n_tokens", n_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name_} must be an integer >= 1, got {value!r}")
    E = normalized_embeddings(model, layer_eig.layer).to(layer_eig.eigenvalues.dtype)
    n_vectors = min(n_vectors, layer_eig.eig.k)
    scores = E @ layer_eig.eigenvectors[:, :n_vectors]  # [d_vocab, n_vectors]
    mask = readable_token_mask(model) if token_mask is None else token_mask.bool()
    if mask.shape != (scores.shape[0],):
        raise ValueError(f"token_mask must have shape ({scores.shape[0]},), got {tuple(mask.shape)}")
    n_tokens = min(n_tokens, int(mask.sum()))
    scores = scores.masked_fill(~mask[:, None], float("nan"))
    tokenizer = getattr(model, "tokenizer", None)

    def name(i: int) -> str:
        return tokenizer.decode([i]) if tokenizer is not None else str(i)

    out = []
    for j in range(n_vectors):
        column = scores[:, j]
        pos = column.nan_to_num(float("-inf")).topk(n_tokens)
        neg = (-column).nan_to_num(float("-inf")).topk(n_tokens)
        out.append(
            EigenvectorTokens(
                index=j,
                eigenvalue=float(layer_eig.eigenvalues[j]),
                positive_ids=pos.indices.tolist(),
                positive_scores=pos.values.tolist(),
                negative_ids=neg.indices.tolist(),
                negative_scores=(-neg.values).tolist(),
                positive_tokens=[name(i) for i in pos.indices.tolist()],
                negative_tokens=[name(i) for i in neg.indices.tolist()],
            )
        )
    return out
