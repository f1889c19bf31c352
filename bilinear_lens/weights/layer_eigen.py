"""Weight-only eigen-readings of a model's bilinear layer: ``Q(u)`` of layer ``l`` for an
output direction, and the vocabulary tokens its eigenvectors align with. No hooks: the
hook-based checks on real activations are in :mod:`bilinear_lens.activations.eigen_readings`.

- :func:`layer_eigendecomposition`: ``Q(u)`` of layer ``l`` for an output direction (a
  token, a ``(token_a, token_b)`` logit difference, or a vector; see
  :mod:`bilinear_lens.weights.directions`), exact or matrix-free.
- :func:`top_tokens_for_eigenvectors`: for the first layer, the vocabulary tokens whose
  (normalised) embeddings (:func:`normalized_embeddings`) align most with each eigenvector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.models.hook_names import check_layer
from bilinear_lens.models.mlp_kinds import MLP_KINDS, model_mlp_kind
from bilinear_lens.models.protocol import HookedModel
from bilinear_lens.weights.directions import resolve_direction
from bilinear_lens.weights.eigen import Eigendecomposition, eigendecompose, top_eigenvectors
from bilinear_lens.weights.tensor import interaction_matrix

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
