"""k-means on spline codes: a partition of tokens that stays coarse at any width.

At realistic width almost every token has a region of its own (see
:mod:`bilinear_lens.activations.code_subsets`), so "tokens sharing a region" says nothing. k-means
on the codes themselves groups tokens whose codes are *close*: a code of ``n_units`` bits is
the 0/1 vector ``b`` in R^n_units, and for two such vectors

    |b - b'|^2 = sum_u (b_u - b'_u)^2 = Hamming(b, b'),

so Euclidean k-means on unpacked codes minimises the summed Hamming distance to each
cluster's (fractional) centroid ``c_j``. Rounding ``c_j`` gives the cluster's *majority code*
``m_j`` (unit ``u`` on when most of the cluster has it on), which minimises
``sum_{i in j} Hamming(b_i, m)`` over all binary codes ``m`` (coordinate by coordinate, the
majority bit disagrees with the fewest members). :attr:`CodeClusters.mean_distance_to_centre`
is the mean of ``Hamming(b_i, m_{a(i)})``: how far a token sits from its cluster's typical
activation pattern, to read against the mean pairwise Hamming distance of the sample.

Tokens with identical codes (one region) always fall in one cluster, so the clusters are
unions of regions: a coarsening of the polytope partition with exactly ``k`` parts at most,
whose label purity (:func:`~bilinear_lens.activations.polytope.purity_report`) can be compared
with its label-shuffled chance level whatever the width. The paper's purity analysis does
the same on activations (:func:`~bilinear_lens.activations.polytope.compare_purity`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import scipy.sparse
import torch
from jaxtyping import Bool, Int, UInt8
from torch import Tensor

from bilinear_lens.activations.kmeans import kmeans
from bilinear_lens.activations.spline_codes import n_code_bytes, unpack_bits

ArrayLike = Union[np.ndarray, Tensor]


@dataclass(frozen=True)
class CodeClusters:
    """A k-means partition of ``n`` tokens' codes.

    ``assignment[i]`` is token ``i``'s cluster in ``0 .. n_clusters - 1`` (dense: every id
    holds a token); ``majority_codes[j]`` cluster ``j``'s majority code (unpacked, ties on);
    ``k`` the clusters asked for (``n_clusters < k`` when the sample has fewer distinct
    codes or a cluster emptied).
    """

    k: int
    n_units: int
    assignment: Int[np.ndarray, "n"]
    majority_codes: Bool[np.ndarray, "n_clusters n_units"]
    distance_to_centre: Int[np.ndarray, "n"]

    @property
    def n_tokens(self) -> int:
        return int(self.assignment.size)

    @property
    def n_clusters(self) -> int:
        return int(self.majority_codes.shape[0])

    @property
    def sizes(self) -> Int[np.ndarray, "n_clusters"]:
        return np.bincount(self.assignment, minlength=self.n_clusters)

    @property
    def mean_distance_to_centre(self) -> float:
        """Mean Hamming distance (units) from a token's code to its cluster's majority code."""
        return float(self.distance_to_centre.mean()) if self.n_tokens else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-token arrays): counts, size statistics, tightness."""
        sizes = self.sizes
        return {
            "k": self.k,
            "n_tokens": self.n_tokens,
            "n_clusters": self.n_clusters,
            "n_units": self.n_units,
            "tokens_per_cluster": {
                "mean": float(sizes.mean()) if sizes.size else 0.0,
                "median": float(np.median(sizes)) if sizes.size else 0.0,
                "max": int(sizes.max()) if sizes.size else 0,
                "singleton_clusters": int((sizes == 1).sum()),
            },
            "mean_distance_to_centre": self.mean_distance_to_centre,
            "mean_fraction_to_centre": self.mean_distance_to_centre / self.n_units if self.n_units else float("nan"),
        }


def unpacked_codes(codes: UInt8[ArrayLike, "n n_bytes"], n_units: int) -> Bool[np.ndarray, "n n_units"]:
    """Packed codes (:func:`~bilinear_lens.activations.spline_codes.pack_bits` rows) as bits; a
    ``ValueError`` naming the widths when ``codes`` is not ``n_code_bytes(n_units)`` wide."""
    array = codes.detach().cpu().numpy() if isinstance(codes, Tensor) else np.asarray(codes)
    if array.ndim != 2 or array.dtype != np.uint8:
        raise ValueError(f"codes must be packed uint8 rows [n, n_bytes], got shape {array.shape} dtype {array.dtype}")
    if array.shape[1] != n_code_bytes(n_units):
        raise ValueError(
            f"codes have {array.shape[1]} bytes per row; n_units={n_units} needs {n_code_bytes(n_units)}")
    return unpack_bits(torch.from_numpy(np.ascontiguousarray(array)), n_units).numpy()


def cluster_codes(
    codes: UInt8[ArrayLike, "n n_bytes"], n_units: int, k: int, seed: int = 0, n_iter: int = 50
) -> CodeClusters:
    """k-means (:func:`~bilinear_lens.activations.kmeans.kmeans`, seeded) of packed codes with
    ``k`` clusters, on the unpacked 0/1 codes (squared distance = Hamming distance; see the
    module docstring). A multi-segment code (several hooks or layers,
    :class:`~bilinear_lens.activations.spline_codes.CodeLayout`) is clustered as one bit string:
    pass the layout's bits, e.g. ``layout.unpack`` repacked, or codes of one segment."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an int >= 1 (clusters), got {k!r}")
    bits = unpacked_codes(codes, n_units)
    if bits.shape[0] == 0:
        raise ValueError("cluster_codes needs at least one code")
    raw, _ = kmeans(bits.astype(np.float32), int(k), n_iter=n_iter, seed=seed)
    assignment = np.unique(raw, return_inverse=True)[1].reshape(-1).astype(np.int64)  # dense ids
    n_clusters = int(assignment.max()) + 1
    one_hot = scipy.sparse.csr_matrix(
        (np.ones(assignment.size, np.int64), (assignment, np.arange(assignment.size))), shape=(n_clusters, assignment.size))
    on = np.asarray(one_hot @ bits.astype(np.int64))  # [n_clusters, n_units]: members with each unit on
    sizes = np.bincount(assignment, minlength=n_clusters)
    majority = 2 * on >= sizes[:, None]
    distance = (bits != majority[assignment]).sum(axis=1).astype(np.int64)
    return CodeClusters(int(k), int(n_units), assignment, majority, distance)


__all__ = ["CodeClusters", "cluster_codes", "unpacked_codes"]
