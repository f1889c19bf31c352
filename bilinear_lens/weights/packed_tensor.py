"""The symmetrised bilinear tensor stored once per unordered tile pair, for contracting
many directions at once.

``Q(u)[i, j] = sum_a u_a Bs[a, i, j]`` with the symmetrised tensor

    Bs[a, i, j] = sum_h W_out[h, a] (L[i, h] R[j, h] + R[i, h] L[j, h]) / 2

(``L = W_in``, ``R = W_gate``, augmented by the bias rows with ``include_bias``; see
:mod:`bilinear_lens.weights.tensor`). ``Bs[a]`` is symmetric, so the full ``d x d`` slab
repeats every off-diagonal number. :class:`PackedSymmetricTensor` cuts the input indices
into tiles of ``tile`` rows and stores only the tile pairs ``(I, J)`` with ``I <= J``, as
one matrix ``packed [d_out, P]`` with ``P = sum_{I <= J} |I| |J|`` (about
``d (d + tile) / 2``: 53% of ``d^2`` at d 512 with tile 32). Contracting ``n`` directions
is then one GEMM ``U @ packed`` (``2 n d_out P`` FLOPs instead of ``2 n d_out d^2``) plus
block copies that write each tile and its transpose into the full symmetric ``Q``.
Building it costs ``2 d_out d_mlp P`` (one GEMM per tile pair), also about half of the
unsymmetrised ``B``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.weights.tensor import BilinearWeights, MLPLike, input_factors

# Tile edge: 32 keeps the stored fraction near half (d 512: 136 of 256 tiles). Measured at d
# 512 / d_mlp 2048 (float32, 2 cores): build 1.9 s (tile 32) vs 2.9 s (64) vs 4.5 s for the
# full B; contracting 128 directions 1.8 vs 2.0 ms per direction (full B: 3.4).
DEFAULT_TILE = 32


class TilePair(NamedTuple):
    """Rows ``rows`` x columns ``cols`` of ``Bs``, stored at ``packed[:, offset : offset + size]``."""

    rows: slice
    cols: slice
    offset: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows.stop - self.rows.start, self.cols.stop - self.cols.start

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


def tile_pairs(d: int, tile: int) -> list[TilePair]:
    """The tile pairs ``(I, J)``, ``I <= J``, covering the upper block triangle of a ``d x d`` matrix."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    edges = [slice(s, min(s + tile, d)) for s in range(0, d, tile)]
    pairs, offset = [], 0
    for a, rows in enumerate(edges):
        for cols in edges[a:]:
            pair = TilePair(rows, cols, offset)
            pairs.append(pair)
            offset += pair.size
    return pairs


def packed_size(d: int, tile: int = DEFAULT_TILE) -> int:
    """``P``: numbers stored per output dim for ``d`` inputs (the columns of ``packed``)."""
    last = tile_pairs(d, tile)[-1]
    return last.offset + last.size


class PackedSymmetricTensor:
    """``Bs`` of one bilinear MLP, upper tile triangle only (see module docstring).

    ``contract(U)`` returns ``Q(U[n])`` for every row, equal (up to float rounding) to
    :func:`~bilinear_lens.weights.tensor.interaction_matrices`.
    """

    def __init__(self, packed: Float[Tensor, "d_out P"], d: int, tile: int) -> None:
        self.pairs = tile_pairs(d, tile)
        expected = packed_size(d, tile)
        if packed.ndim != 2 or packed.shape[1] != expected:
            raise ValueError(f"packed must be [d_out, {expected}] for d={d}, tile={tile}; got shape {tuple(packed.shape)}")
        self.packed, self.d, self.tile = packed, d, tile

    @classmethod
    def build(cls, mlp: MLPLike, include_bias: bool = False, tile: int = DEFAULT_TILE) -> "PackedSymmetricTensor":
        """Build ``Bs`` from the weight factors, one GEMM per tile pair."""
        w = BilinearWeights.from_module(mlp)
        L, R = (m.T.contiguous() for m in input_factors(w, include_bias))  # [d_mlp, d]
        d = L.shape[1]
        pairs = tile_pairs(d, tile)
        packed = L.new_empty(w.d_out, packed_size(d, tile))
        out_t = w.W_out.T  # [d_out, d_mlp]
        for p in pairs:
            # Z[h, i, j] = (L[i, h] R[j, h] + R[i, h] L[j, h]) / 2 for i in rows, j in cols
            Z = L[:, p.rows, None] * R[:, None, p.cols]
            Z += R[:, p.rows, None] * L[:, None, p.cols]
            packed[:, p.offset : p.offset + p.size] = out_t @ Z.view(w.d_mlp, p.size)
        packed *= 0.5
        if include_bias and w.b_out is not None:  # x' = [x, 1]: the corner carries u . b_out
            last = pairs[-1]
            packed[:, last.offset + last.size - 1] += w.b_out
        return cls(packed, d, tile)

    @property
    def d_out(self) -> int:
        return self.packed.shape[0]

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def contract(self, U: Float[Tensor, "n d_out"]) -> Float[Tensor, "n d d"]:
        """The symmetric ``Q(U[n])`` of every row of ``U``: one GEMM, then tile copies."""
        if U.ndim != 2 or U.shape[1] != self.d_out:
            raise ValueError(f"U must be [n_dirs, {self.d_out}], got shape {tuple(U.shape)}")
        flat = U.to(self.packed) @ self.packed
        Q = flat.new_empty(U.shape[0], self.d, self.d)
        for p in self.pairs:
            block = flat[:, p.offset : p.offset + p.size].view(-1, *p.shape)
            if p.rows == p.cols:  # mirror the upper triangle: the GEMM may round (i, j) and (j, i) apart
                upper = block.triu(1)
                Q[:, p.rows, p.cols] = upper + upper.mT + torch.diag_embed(block.diagonal(dim1=-2, dim2=-1))
            else:
                Q[:, p.rows, p.cols] = block
                Q[:, p.cols, p.rows] = block.mT
        return Q


__all__ = ["DEFAULT_TILE", "PackedSymmetricTensor", "TilePair", "packed_size", "tile_pairs"]
