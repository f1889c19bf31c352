"""The layered graph view: self-contained (no external script or link), renders in headless
Chromium with one element per node of the pruned graph, and 2,000 nodes in under 2 s
(timed in the page with performance.now)."""

import re

import pytest
import torch

from browser import CHROMIUM, ERROR_RECORDER, dump_dom, screenshot
from bilinear_lens.circuits.graph import AttributionGraph, GraphNode, GraphTarget, attribution_graph
from bilinear_lens.circuits.graph_prune import prune_graph
from bilinear_lens.views.graph_view import GraphView, graph_html, graph_payload
from fixtures.linearized_models import prompt, random_model

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary: .ci/run installs Debian's chromium; install it to run")


@pytest.fixture(scope="module")
def pruned():
    model, tokens = random_model(), prompt()
    return prune_graph(attribution_graph(model, tokens, split="neurons", top_k=2), node_threshold=0.8, edge_threshold=0.95)


def synthetic_graph(n_nodes: int, n_layers: int = 6, n_pos: int = 40, edges_per_node: int = 4) -> AttributionGraph:
    """A DAG of ``n_nodes`` heads/MLP nodes over the layers, each with a few random inputs."""
    gen = torch.Generator().manual_seed(0)
    nodes = [GraphNode("embedding", -1, p, p, 1.0, f"tok {p}") for p in range(n_pos)]
    kinds = ["head", "mlp"]
    while len(nodes) < n_nodes - 1:
        k = len(nodes)
        layer = min(n_layers - 1, (k - n_pos) * n_layers // (n_nodes - n_pos))
        nodes.append(GraphNode(kinds[k % 2], layer, k % n_pos, k % 4, float(torch.randn((), generator=gen)), f"n{k}"))
    nodes.append(GraphNode("logit", n_layers, n_pos - 1, 3, 2.0, "logit", activation=0.5))
    A = torch.zeros(len(nodes), len(nodes), dtype=torch.float64)
    for t in range(n_pos, len(nodes)):
        src = torch.randint(0, t, (edges_per_node,), generator=gen)
        A[t, src] = torch.randn(edges_per_node, generator=gen, dtype=torch.float64)
    target = GraphTarget("logit", torch.zeros(8), n_pos - 1, token_id=3)
    return AttributionGraph(nodes, A, [target], 2.0, list(range(n_pos)), [f"t{p}" for p in range(n_pos)], n_layers, "none", True)


def test_page_is_self_contained(pruned, tmp_path):
    page = graph_html(pruned)
    assert "http" not in page and "<link" not in page and not re.search(r"<script[^>]*\ssrc=", page)
    assert page.startswith("<!DOCTYPE html>")
    fragment = GraphView(pruned)._repr_html_()
    assert "<html" not in fragment and "graph-data" in fragment and "http" not in fragment
    assert pruned._repr_html_().count('class="bl-graph"') == 1
    path = GraphView(pruned).save(tmp_path / "g.html")
    assert path.read_text().startswith("<!DOCTYPE html>")
    payload = graph_payload(pruned)
    assert len(payload["nodes"]) == len(pruned.nodes) and len(payload["edges"]) == pruned.n_edges


def rendered(page: str, tmp_path):
    dom = dump_dom(page.replace("<head>", "<head>\n" + ERROR_RECORDER, 1), tmp_path)
    errors = re.search(r'data-js-errors="([^"]*)"', dom)
    assert errors is None, f"console errors: {errors.group(1)}"
    return dom


@needs_chromium
def test_chromium_renders_every_node_of_the_pruned_graph(pruned, tmp_path):
    dom = rendered(graph_html(pruned), tmp_path)
    assert len(re.findall(r'<circle class="node" data-i="\d+"', dom)) == len(pruned.nodes)
    assert len(re.findall(r'<path class="edge" data-j="\d+"', dom)) == pruned.n_edges
    assert f'data-rendered-nodes="{len(pruned.nodes)}"' in dom
    assert re.search(rf"{pruned.n_edges} of {pruned.n_edges} edges", dom)
    page_path = tmp_path / "view.html"
    page_path.write_text(graph_html(pruned))
    png = tmp_path / "view.png"
    screenshot(page_path, png, width=1400, height=900)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_chromium
def test_two_thousand_nodes_render_within_two_seconds(tmp_path):
    graph = synthetic_graph(2000)
    dom = rendered(graph_html(graph), tmp_path)
    assert len(re.findall(r'<circle class="node" data-i="\d+"', dom)) == 2000
    ms = float(re.search(r'<span class="render-ms">([\d.]+)</span>', dom).group(1))
    assert ms < 2000, f"rendering 2,000 nodes took {ms} ms"
