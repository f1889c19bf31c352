"""Influence-based pruning of an attribution graph (the algorithm circuit-tracer publishes,
re-implemented from its description in Ameisen et al. 2025, "Circuit Tracing").

With ``A[t, s]`` the edge from ``s`` into ``t`` and ``w`` the targets' weights (their
probabilities) on the logit nodes:

1. normalise: ``N[t, s] = |A[t, s]| / sum_s' |A[t, s']|`` (each node's inputs as fractions;
   a row without inputs stays zero);
2. influence: ``I = w^T (N + N^2 + N^3 + ...) = w^T ((1 - N)^-1 - 1)``: how much of the
   targets flows through each node along all paths (``N`` is nilpotent: the graph is a DAG);
3. nodes: keep the most influential nodes until their influence reaches ``node_threshold`` of
   the total (embeddings and logits are always kept);
4. edges: on the graph of kept nodes, renormalise, recompute influence ``I'``, score each
   edge ``N'[t, s] (I'_t + w_t)`` and keep the best edges up to ``edge_threshold`` of the
   total score;
5. clean-up, repeated until nothing changes: drop a node (not an embedding or logit) without
   a kept outgoing edge, and a node that has inputs but no kept incoming edge; drop the
   edges of dropped nodes.

"Up to a cumulative threshold": sort scores in decreasing order and keep the shortest prefix
whose sum reaches ``threshold x total`` (ties with the last kept score are kept too).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor


def normalize_rows(adjacency: Float[Tensor, "n n"]) -> Float[Tensor, "n n"]:
    """``|A|`` with each row divided by its sum (zero rows stay zero)."""
    magnitude = adjacency.abs()
    total = magnitude.sum(1, keepdim=True)
    return torch.where(total > 0, magnitude / total.clamp_min(torch.finfo(magnitude.dtype).tiny), torch.zeros_like(magnitude))


def influence(normalized: Float[Tensor, "n n"], weights: Float[Tensor, "n"]) -> Float[Tensor, "n"]:
    """``w^T (N + N^2 + ...)``, summed until the term vanishes (at most ``n`` terms for a DAG);
    a graph with a cycle is refused."""
    term = weights @ normalized
    total = term.clone()
    for _ in range(normalized.shape[0]):
        if not bool(term.any()):
            return total
        term = term @ normalized
        total = total + term
    if bool(term.any()):
        raise ValueError("the adjacency matrix has a cycle: influence is defined for a DAG only")
    return total


def cumulative_keep(scores: Float[Tensor, "m"], threshold: float) -> Bool[Tensor, "m"]:
    """The highest ``scores`` whose sum first reaches ``threshold x total`` (ties kept)."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold={threshold!r} must lie in [0, 1]")
    if scores.numel() == 0 or not bool((scores > 0).any()):
        return torch.zeros_like(scores, dtype=torch.bool)
    ordered = scores.sort(descending=True).values
    cum = ordered.cumsum(0) / ordered.sum()
    # tolerance: a threshold of 1 must keep every positive score despite rounding in cumsum
    k = int((cum < threshold - 1e-12).sum())
    cutoff = ordered[min(k, ordered.numel() - 1)]
    return (scores >= cutoff) & (scores > 0)


@dataclass
class PruneResult:
    """Masks over the original graph's nodes and edges, and the influences that chose them."""

    node_mask: Bool[Tensor, "n"]
    edge_mask: Bool[Tensor, "n n"]
    node_influence: Float[Tensor, "n"]
    edge_scores: Float[Tensor, "n n"]


def prune_adjacency(
    adjacency: Float[Tensor, "n n"],
    weights: Float[Tensor, "n"],
    always_keep: Bool[Tensor, "n"],
    has_inputs: Bool[Tensor, "n"],
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
) -> PruneResult:
    """Steps 1-5 of the module docstring on a bare adjacency matrix.

    ``always_keep``: embeddings and logits; ``has_inputs``: nodes that can have incoming
    edges (not sources), which need a kept incoming edge to stay."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{name}={value!r} must lie in [0, 1]")
    A = adjacency.double()
    node_influence = influence(normalize_rows(A), weights.double())
    node_mask = cumulative_keep(torch.where(always_keep, torch.zeros_like(node_influence), node_influence), node_threshold)
    node_mask |= always_keep
    kept = A * node_mask[:, None] * node_mask[None, :]
    normalized = normalize_rows(kept)
    edge_scores = normalized * (influence(normalized, weights.double()) + weights.double())[:, None]
    edge_mask = cumulative_keep(edge_scores.flatten(), edge_threshold).view_as(edge_scores) & (kept != 0)
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        new_mask = node_mask.clone()
        new_mask &= always_keep | edge_mask.any(0)  # an outgoing edge
        new_mask &= always_keep | ~has_inputs | edge_mask.any(1)  # an incoming edge, if it can have one
        if bool((new_mask == node_mask).all()):
            break
        node_mask = new_mask
    return PruneResult(node_mask, edge_mask, node_influence, edge_scores)


def prune_graph(graph: Any, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Any:
    """The :class:`~bilinear_lens.circuits.graph.AttributionGraph` restricted to the nodes and
    edges pruning keeps (dropped edges are zero); ``meta`` gains ``influence`` (per kept node),
    the thresholds and the original node count. Node values are unchanged (a kept node's
    value still counts its dropped inputs)."""
    always = torch.tensor([n.kind in ("embedding", "logit") for n in graph.nodes])
    has_inputs = torch.tensor([not n.is_source for n in graph.nodes])
    result = prune_adjacency(graph.adjacency, graph.target_weights, always, has_inputs, node_threshold, edge_threshold)
    keep = result.node_mask.nonzero().flatten()
    adjacency = (graph.adjacency * result.edge_mask)[keep][:, keep]
    meta = dict(graph.meta, influence=result.node_influence[keep].tolist(), node_threshold=node_threshold,
                edge_threshold=edge_threshold, n_nodes_before=len(graph.nodes), n_edges_before=graph.n_edges)  # fmt: skip
    return replace(graph, nodes=[graph.nodes[i] for i in keep.tolist()], adjacency=adjacency, meta=meta)
