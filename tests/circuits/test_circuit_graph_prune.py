"""Influence-based pruning (circuit-tracer's published algorithm, re-implemented) against
influences and kept sets worked out by hand on small fixture graphs, and its invariants on a
real graph."""

from fractions import Fraction as F

import pytest
import torch

from bilinear_lens.circuits.graph import attribution_graph
from bilinear_lens.circuits.graph_prune import cumulative_keep, influence, normalize_rows, prune_adjacency, prune_graph
from fixtures.linearized_models import prompt, random_model


def fixture(with_extra: bool):
    """Nodes e0, e1 (embeddings), a, b (inner), [c, d], L (logit, weight 1); A[t, s] = edge s -> t."""
    names = ["e0", "e1", "a", "b"] + (["c", "d"] if with_extra else []) + ["L"]
    ix = {n: i for i, n in enumerate(names)}
    A = torch.zeros(len(names), len(names), dtype=torch.float64)
    edges = {("a", "e0"): 2, ("a", "e1"): -1, ("b", "a"): 1, ("b", "e1"): 3, ("L", "a"): 1, ("L", "b"): -2}
    if with_extra:  # c barely reaches L; d is a dead end
        edges |= {("c", "e0"): 1, ("d", "e1"): 5, ("L", "c"): 0.03}
    for (t, s), w in edges.items():
        A[ix[t], ix[s]] = w
    weights = torch.zeros(len(names), dtype=torch.float64)
    weights[ix["L"]] = 1
    always = torch.tensor([n in ("e0", "e1", "L") for n in names])
    has_inputs = torch.tensor([n not in ("e0", "e1") for n in names])
    return names, A, weights, always, has_inputs


def test_influence_matches_hand_computation():
    """Rows of |A| normalised: a (2/3 e0, 1/3 e1), b (1/4 a, 3/4 e1), L (1/3 a, 2/3 b).
    w N = (a 1/3, b 2/3); w N^2 = (e0 2/9, e1 11/18, a 1/6); w N^3 = (e0 1/9, e1 1/18); then 0."""
    names, A, weights, _, _ = fixture(False)
    expected = {"e0": F(1, 3), "e1": F(2, 3), "a": F(1, 2), "b": F(2, 3), "L": F(0)}
    got = influence(normalize_rows(A), weights)
    for name, value in expected.items():
        assert abs(float(got[names.index(name)]) - float(value)) < 1e-15, name
    N = normalize_rows(A)  # closed form: w ((1 - N)^-1 - 1)
    closed = weights @ (torch.linalg.inv(torch.eye(len(names), dtype=torch.float64) - N) - torch.eye(len(names), dtype=torch.float64))
    torch.testing.assert_close(got, closed, rtol=0, atol=1e-15)


def test_cumulative_keep():
    scores = torch.tensor([0.1, 0.5, 0.2, 0.2, 0.0], dtype=torch.float64)
    assert cumulative_keep(scores, 0.5).tolist() == [False, True, False, False, False]
    assert cumulative_keep(scores, 0.6).tolist() == [False, True, True, True, False]  # the tie is kept
    assert cumulative_keep(scores, 1.0).tolist() == [True, True, True, True, False]  # zeros never
    with pytest.raises(ValueError, match=r"^threshold=1.5 must lie in \[0, 1\]$"):
        cumulative_keep(scores, 1.5)


@pytest.mark.parametrize(
    ("edge_threshold", "kept_nodes", "kept_edges"),
    [
        # scores (see below): L<-b 2/3, b<-e1 1/2, a<-e0 1/3, L<-a 1/3, a<-e1 1/6, b<-a 1/6;
        # cumulative 4/13, 7/13, 9/13, 11/13, 1: 0.8 keeps the first four (a tie at 1/3)
        (0.8, {"e0", "e1", "a", "b", "L"}, {("L", "b"), ("b", "e1"), ("a", "e0"), ("L", "a")}),
        # 0.5 keeps L<-b and b<-e1: a loses its outgoing edge and is cleaned up
        (0.5, {"e0", "e1", "b", "L"}, {("L", "b"), ("b", "e1")}),
    ],
)
def test_prune_matches_hand_computation(edge_threshold, kept_nodes, kept_edges):
    """Influence (non-always nodes): a = 1/3.03 + 2/3.03 * 1/4 = 0.495, b = 2/3.03 = 0.660,
    c = 0.03/3.03 = 0.0099, d = 0; node_threshold 0.95 keeps b then a (0.991 of the total):
    c and d go. On the kept graph (the 4-node fixture) influence + w: a 1/2, b 2/3, L 1, so
    edge scores are N[t, s] (I_t + w_t) as listed in the parameters."""
    names, A, weights, always, has_inputs = fixture(True)
    result = prune_adjacency(A, weights, always, has_inputs, node_threshold=0.95, edge_threshold=edge_threshold)
    assert abs(float(result.node_influence[names.index("a")]) - 1.5 / 3.03) < 1e-15
    assert {n for n, k in zip(names, result.node_mask.tolist()) if k} == kept_nodes
    got_edges = {(names[t], names[s]) for t, s in result.edge_mask.nonzero().tolist()}
    assert got_edges == kept_edges
    ix = {n: i for i, n in enumerate(names)}
    assert abs(float(result.edge_scores[ix["b"], ix["e1"]]) - 0.5) < 1e-15


def test_prune_rejects_bad_thresholds_and_cycles():
    names, A, weights, always, has_inputs = fixture(False)
    with pytest.raises(ValueError, match=r"^node_threshold=2 must lie in \[0, 1\]$"):
        prune_adjacency(A, weights, always, has_inputs, node_threshold=2)
    cyclic = A.clone()
    cyclic[names.index("a"), names.index("b")] = 1.0
    with pytest.raises(ValueError, match="has a cycle"):
        influence(normalize_rows(cyclic), weights)


def test_prune_graph_invariants():
    model, tokens = random_model(), prompt()
    graph = attribution_graph(model, tokens)
    pruned = prune_graph(graph, node_threshold=0.6, edge_threshold=0.9)
    assert 0 < len(pruned.nodes) < len(graph.nodes)
    assert {n.node_id for n in graph.nodes if n.kind in ("embedding", "logit")} <= {n.node_id for n in pruned.nodes}
    A = pruned.adjacency
    for i, node in enumerate(pruned.nodes):
        if node.kind not in ("embedding", "logit"):
            assert A[:, i].any(), node.node_id  # an outgoing edge
            if not node.is_source:
                assert A[i].any(), node.node_id  # an incoming edge
    for i, node in enumerate(pruned.nodes):  # kept edges keep their weights
        for j, src in enumerate(pruned.nodes):
            if A[i, j] != 0:
                assert A[i, j] == graph.adjacency[graph.index(node.node_id), graph.index(src.node_id)]
    assert pruned.meta["n_nodes_before"] == len(graph.nodes) and len(pruned.meta["influence"]) == len(pruned.nodes)
    everything = prune_graph(graph, node_threshold=1.0, edge_threshold=1.0)
    reachable = influence(normalize_rows(graph.adjacency), graph.target_weights) > 0
    assert len(everything.nodes) == int((reachable | torch.tensor([n.kind in ("embedding", "logit") for n in graph.nodes])).sum())
