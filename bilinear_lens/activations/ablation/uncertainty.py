"""Uncertainty of sweep effects: standard errors clustered by document, p-values, and a
false-discovery-rate correction over the neurons of a sweep.

A sweep's built-in metrics are means over tokens (``delta_loss``: the mean next-token loss
change over every predicted token; a logit metric: over the rows' positions). Tokens of one
document are not independent samples (a neuron that matters for one story moves all of its
tokens), and rows cut from one token stream share documents, so the standard error of such a
mean is taken over **clusters**, one per document (Cameron and Miller 2015, "A practitioner's
guide to cluster-robust inference"): with per-token deltas ``d_t``, ``n`` tokens in all,
cluster sums ``S_g = sum_{t in g} d_t`` over ``n_g`` tokens and ``G`` clusters,

    mean  m  = sum_g S_g / n
    SE(m)^2  = G / (G - 1) * sum_g (S_g - n_g m)^2 / n^2

(the CR1 sandwich estimator of an intercept-only regression). With one cluster per row of
equal length this is exactly ``std(row means, ddof=1) / sqrt(rows)``, the rule before
clusters. ``G < 2`` has no spread: ``NaN``.

Each effect gets a two-sided p-value from Student's t with ``G - 1`` degrees of freedom
(``t = m / SE``), and the p-values of one sweep are adjusted together by Benjamini and
Hochberg (1995) (:func:`scipy.stats.false_discovery_control`): a sweep tests every neuron of
a layer, so at ``p < 0.05`` about 5 % of null neurons would look real; ``q < alpha`` keeps the
expected share of false discoveries among those called distinguishable below ``alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy import stats
from torch import Tensor

__all__ = ["DEFAULT_FDR", "Clusters", "clustered_standard_error", "document_ids", "effect_p_values",
           "false_discovery_q_values", "row_clusters", "uncertainty_columns", "uncertainty_record"]

# The false discovery rate below which a sweep calls an effect distinguishable from zero.
DEFAULT_FDR = 0.05


def document_ids(rows: Int[Tensor, "batch pos"], bos_token_id: Optional[int], overlap: int = 0) -> Int[Tensor, "batch pos"]:
    """Which document each token of ``rows`` belongs to, for rows cut from one token stream
    with a BOS before each document (:func:`~bilinear_lens.data.packing.stream_rows`): the
    stream is the rows in order, the last row re-reading ``overlap`` tokens of the one
    before; a document starts at each BOS. Tokens before the stream's first BOS are
    document 0, as is everything when ``bos_token_id`` is ``None`` (no document marks:
    one cluster, so pass rows as clusters instead, :func:`row_clusters`)."""
    n_rows, n_pos = rows.shape
    if not 0 <= overlap < n_pos or (overlap and n_rows < 2):
        raise ValueError(f"overlap must be in [0, {n_pos}) and needs 2 rows, got {overlap} with {n_rows} row(s)")
    stream = torch.cat([rows[:-1].reshape(-1), rows[-1, overlap:]]) if n_rows > 1 else rows[0]
    starts = torch.zeros_like(stream) if bos_token_id is None else (stream == bos_token_id).long()
    ids = torch.cumsum(starts, 0) - starts[0]  # the first document is 0 whether or not a BOS opens it
    body, last = ids[: (n_rows - 1) * n_pos].view(n_rows - 1, n_pos), ids[-n_pos:]
    return torch.cat([body, last[None]]) if n_rows > 1 else last[None]


def row_clusters(rows: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """One cluster per row (rows taken as independent samples)."""
    return torch.arange(rows.shape[0])[:, None].expand(rows.shape).clone()


@dataclass(frozen=True)
class Clusters:
    """Cluster labels of the values one metric averages: ``index[k]`` is value ``k``'s
    cluster in ``[0, n_clusters)`` (values flattened row-major), ``sizes[g]`` = ``n_g``."""

    index: Int[Tensor, "n_values"]
    sizes: Float[Tensor, "n_clusters"]

    @classmethod
    def of(cls, labels: Int[Tensor, "..."]) -> "Clusters":
        """From any integer labels (relabelled ``0..G-1`` in sorted order)."""
        _, index = torch.unique(labels.reshape(-1), return_inverse=True)
        sizes = torch.bincount(index).double()
        return cls(index, sizes)

    @property
    def n_clusters(self) -> int:
        return int(self.sizes.shape[0])

    def sums(self, values: Float[Tensor, "..."]) -> Float[Tensor, "n_clusters"]:
        """``S_g``: ``values`` (flattened as the labels were) summed per cluster, float64."""
        flat = values.reshape(-1).double().cpu()
        if flat.shape[0] != self.index.shape[0]:
            raise ValueError(f"values hold {flat.shape[0]} entries but the clusters label {self.index.shape[0]}")
        return torch.zeros(self.n_clusters, dtype=torch.float64).index_add_(0, self.index, flat)


def clustered_standard_error(sums: Float[Tensor, "n G"], sizes: Float[Tensor, "G"]) -> Float[Tensor, "n"]:
    """CR1 standard error (module docstring) of each mean ``sums[i].sum() / sizes.sum()``,
    from its cluster sums; ``NaN`` with fewer than 2 clusters."""
    n_clusters = sizes.shape[0]
    if n_clusters < 2:
        return torch.full(sums.shape[:-1], float("nan"), dtype=torch.float64)
    total = sizes.sum()
    mean = sums.sum(-1, keepdim=True) / total
    spread = ((sums - sizes * mean) ** 2).sum(-1)
    return (n_clusters / (n_clusters - 1) * spread).sqrt() / total


def effect_p_values(effect: Float[Tensor, "n"], se: Float[Tensor, "n"], n_clusters: int) -> Float[Tensor, "n"]:
    """Two-sided p-values of ``effect = 0`` from Student's t with ``n_clusters - 1`` degrees of
    freedom; ``NaN`` where the standard error is. A zero standard error gives p = 1 for a zero
    effect and 0 otherwise (no spread at all: the effect is the same on every cluster)."""
    effect, se = effect.double(), se.double()
    if n_clusters < 2:
        return torch.full_like(effect, float("nan"))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (effect / se).abs().numpy()
    p = 2 * stats.t.sf(t, df=n_clusters - 1)
    p = np.where(se.numpy() == 0, np.where(effect.numpy() == 0, 1.0, 0.0), p)
    return torch.from_numpy(np.where(np.isnan(se.numpy()), np.nan, p))


def false_discovery_q_values(p: Float[Tensor, "n"]) -> Float[Tensor, "n"]:
    """Benjamini-Hochberg adjusted p-values (q-values) of the finite ``p``, adjusted
    together; ``NaN`` stays ``NaN`` and does not count in the family."""
    p = p.double()
    finite = ~torch.isnan(p)
    q = torch.full_like(p, float("nan"))
    if bool(finite.any()):
        q[finite] = torch.from_numpy(stats.false_discovery_control(p[finite].numpy(), method="bh"))
    return q



def uncertainty_columns(
    effects: Mapping[str, Float[Tensor, "n"]], delta_sums: Mapping[str, Float[Tensor, "n G"]],
    clusters: Mapping[str, Clusters],
) -> dict[str, Float[Tensor, "n"]]:
    """``delta_X_se`` / ``delta_X_p`` / ``delta_X_q`` for each metric ``X`` of ``delta_sums``
    (its per-cluster sums of ablated minus clean values, ``[n, G]``), from the effects
    ``effects["delta_X"]`` and the metric's ``clusters``: the columns a sweep's table adds."""
    columns: dict[str, Tensor] = {}
    for name, sums in delta_sums.items():
        se = clustered_standard_error(sums, clusters[name].sizes)
        p = effect_p_values(effects[f"delta_{name}"], se, clusters[name].n_clusters)
        columns.update({f"delta_{name}_se": se, f"delta_{name}_p": p, f"delta_{name}_q": false_discovery_q_values(p)})
    return columns


def uncertainty_record(documents: Optional[Tensor], clusters: Mapping[str, Clusters]) -> dict[str, Any]:
    """``NeuronTable.uncertainty``: what the standard errors were clustered by, and how many."""
    return {"clusters": "rows" if documents is None else "documents",
            "n_clusters": {name: c.n_clusters for name, c in clusters.items()}}
