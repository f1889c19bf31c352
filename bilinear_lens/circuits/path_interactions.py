"""Weight-based path interactions of a bilinear MLP (Sharkey 2023, arXiv 2305.03452).

Layer ``l``'s MLP reads ``u . MLP(x) = x^T Q(u) x`` (biases aside). Instead of activations,
project ``Q(u)`` onto *path bases* built from the weights alone, each a set of vectors in
the MLP's input coordinates (``[n_tokens, d_model]``):

- ``embed``: token embeddings straight into the MLP, ``A(W_E[t] (+ mean W_pos))``;
- ``L{l'}H{h}`` (``l' <= l``): the head's OV circuit applied to the embeddings, *virtual
  tokens* ``A(ln1_{l'}(W_E[t]) W_V[h] W_O[h] (+ b_V[h] W_O[h]))``: what the head writes
  when it attends fully to token ``t`` (its ln1 reads the embedding alone, the direct path);
- ``MLP{l'}`` (``l' < l``): the earlier MLP's output on the embedding alone,
  ``A(MLP_{l'}(ln2_{l'}(W_E[t])) - b_out)``.

``A(v) = (v - [mean v]) * [w] / s`` is ln2's linear part with scale ``s`` frozen: by default
the scale ln2 gives the token's own embedding (so ``embed`` is exactly
:func:`~bilinear_lens.activations.eigen_readings.normalized_embeddings`), or one given
``scale`` for every vector (e.g. the observed ``hook_scale``). A per-token interaction block
is ``block(a, b)[t, t'] = a_t^T Q(u) b_t'``: how token ``t`` on path ``a`` and token ``t'`` on
path ``b``, present together, drive ``u . MLP``. When the stream really is the sum of those
paths (attention one-hot on the source token, the scale frozen) a block entry equals the
hook-based pair term of :func:`~bilinear_lens.circuits.pairs.mlp_pair_decomposition`.

*Composition scores* (token-free): with ``O_a`` the writer's output map into the residual
(``W_E``, ``W_V[h] W_O[h]``, ``W_out``) and ``P = O A`` (unit scale),
``score(a, b) = |P_a Q P_b^T|_F / (|P_a|_F |P_b|_F |Q|_F)`` lies in ``[0, 1]`` and measures
how much the two writers' output spaces interact through ``Q(u)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.weights.layer_eigen import bilinear_layer
from bilinear_lens.circuits.pairs import CENTRING_NORMS, WEIGHTED_NORMS
from bilinear_lens.weights.directions import DirectionLike, resolve_direction
from bilinear_lens.weights.tensor import interaction_matrix


def _linear_norm(model: Any, layer: int, norm: str, vectors: Tensor) -> Tensor:
    """``(v - [mean]) * [w]``: norm ``blocks[layer].{norm}``'s linear part, scale left out."""
    kind = model.cfg.normalization_type
    if kind is None:
        return vectors
    out = vectors - vectors.mean(-1, keepdim=True) if kind in CENTRING_NORMS else vectors
    if kind in WEIGHTED_NORMS:
        out = out * getattr(model.blocks[layer], norm).weight.detach().to(out.dtype)
    return out


def _apply_norm(model: Any, layer: int, norm: str, vectors: Tensor) -> Tensor:
    """The norm applied to each row alone (its own scale), bias included."""
    if model.cfg.normalization_type is None:
        return vectors
    return getattr(model.blocks[layer], norm)(vectors)


def _own_scale(model: Any, vectors: Tensor, eps: float) -> Tensor:
    """``[n, 1]``: the scale a norm gives each row alone (1 without a norm)."""
    kind = model.cfg.normalization_type
    if kind is None:
        return vectors.new_ones(vectors.shape[0], 1)
    centred = vectors - vectors.mean(-1, keepdim=True) if kind in CENTRING_NORMS else vectors
    return (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()


@dataclass
class PathInteractions:
    """``Q`` (``Q(u)`` of layer ``layer``, ``[d_model, d_model]``), the path bases
    (``bases[name]``: ``[d_vocab, d_model]`` MLP-input vectors, one per token), their output
    maps (``output_maps[name]``, for composition scores) and the composition-score matrix
    ``composition`` over ``names`` (module docstring)."""

    layer: int
    direction: Float[Tensor, "d_model"]
    Q: Float[Tensor, "d_model d_model"]
    names: list[str]
    bases: dict[str, Tensor]
    output_maps: dict[str, Tensor]
    composition: Float[Tensor, "n n"]
    token_strs: Optional[list[str]] = field(default=None, repr=False)

    def _basis(self, name: str, tokens: Optional[Sequence[int]]) -> Tensor:
        if name not in self.bases:
            raise ValueError(f"path {name!r} is not one of {self.names}")
        basis = self.bases[name]
        if tokens is None:
            return basis
        ids = torch.as_tensor(list(tokens), dtype=torch.long)
        bad = ids[(ids < 0) | (ids >= basis.shape[0])]
        if bad.numel():
            raise ValueError(f"tokens {bad.tolist()[:8]} are out of range [0, {basis.shape[0]})")
        return basis[ids]

    def block(
        self, a: str, b: str, tokens_a: Optional[Sequence[int]] = None, tokens_b: Optional[Sequence[int]] = None
    ) -> Float[Tensor, "n_a n_b"]:
        """``block[t, t'] = a_t^T Q b_t'`` for tokens ``tokens_a`` on path ``a`` and
        ``tokens_b`` on path ``b`` (all tokens by default)."""
        return self._basis(a, tokens_a) @ self.Q @ self._basis(b, tokens_b).T

    def top_composition(self, k: int = 10) -> list[tuple[str, str, float]]:
        """The ``k`` largest composition scores ``(path a, path b, score)``, ``a <= b``."""
        n = len(self.names)
        rows, cols = torch.triu_indices(n, n)
        values = self.composition[rows, cols]
        order = values.argsort(descending=True)[:k]
        return [(self.names[int(rows[i])], self.names[int(cols[i])], float(values[i])) for i in order]


@torch.no_grad()
def path_interactions(
    model: Any,
    layer: int,
    direction: DirectionLike,
    scale: Union[float, Tensor, None] = None,
    heads: bool = True,
    mlps: bool = True,
) -> PathInteractions:
    """Project layer ``layer``'s ``Q(u)`` onto the path bases ``embed``, every head
    ``L{l'}H{h}`` with ``l' <= layer`` (``heads``) and every earlier MLP ``MLP{l'}`` (``mlps``;
    earlier MLPs must be bilinear or any other kind: only their forward is used). ``scale``:
    ln2's frozen scale for every vector (default: each token's own embedding scale). From
    the weights alone; see the module docstring."""
    mlp = bilinear_layer(model, layer)
    u = resolve_direction(model, direction)
    dtype = mlp.W_in.dtype
    Q = interaction_matrix(mlp, u.to(dtype))
    emb = model.W_E.detach().to(dtype)
    W_pos = getattr(model, "W_pos", None)
    if W_pos is not None:
        emb = emb + W_pos.detach().to(dtype).mean(0)
    eps = float(getattr(model.cfg, "eps", 1e-5))
    if scale is None:
        s = _own_scale(model, emb, eps)
    else:
        s = torch.as_tensor(scale, dtype=dtype).reshape(-1, 1)
        if not bool((s > 0).all()) or s.shape[0] not in (1, emb.shape[0]):
            raise ValueError(f"scale must be positive: one value or one per token ({emb.shape[0]}), got {scale!r}")

    def into_mlp(vectors: Tensor) -> Tensor:
        return _linear_norm(model, layer, "ln2", vectors) / s

    bases: dict[str, Tensor] = {"embed": into_mlp(emb)}
    maps: dict[str, Tensor] = {"embed": emb}
    if heads:
        for l in range(layer + 1):
            attn = model.blocks[l].attn
            attn = getattr(attn, "original_component", attn)
            source = _apply_norm(model, l, "ln1", emb)
            for h in range(model.cfg.n_heads):
                OV = attn.W_V[h].detach().to(dtype) @ attn.W_O[h].detach().to(dtype)  # [d_model, d_model]
                virtual = source @ OV
                if attn.b_V is not None:
                    virtual = virtual + attn.b_V[h].detach().to(dtype) @ attn.W_O[h].detach().to(dtype)
                bases[f"L{l}H{h}"], maps[f"L{l}H{h}"] = into_mlp(virtual), OV
    if mlps:
        for l in range(layer):
            earlier = getattr(model.blocks[l], "mlp", None)
            if earlier is None:
                continue
            out = earlier(_apply_norm(model, l, "ln2", emb))
            if getattr(earlier, "b_out", None) is not None:
                out = out - earlier.b_out.detach().to(dtype)
            bases[f"MLP{l}"], maps[f"MLP{l}"] = into_mlp(out), earlier.W_out.detach().to(dtype)
    names = list(bases)
    P = [_linear_norm(model, layer, "ln2", maps[n]) for n in names]
    QF = Q.norm()
    norms = torch.stack([p.norm() for p in P])
    composition = torch.zeros(len(names), len(names), dtype=dtype)
    for i, Pa in enumerate(P):
        PaQ = Pa @ Q
        for j in range(i, len(names)):
            value = (PaQ @ P[j].T).norm() / (norms[i] * norms[j] * QF).clamp_min(torch.finfo(dtype).tiny)
            composition[i, j] = composition[j, i] = value
    strs = None
    if getattr(model, "tokenizer", None) is not None:
        strs = [model.tokenizer.decode([t]) for t in range(model.cfg.d_vocab)]
    return PathInteractions(layer, u, Q, names, bases, maps, composition, strs)
