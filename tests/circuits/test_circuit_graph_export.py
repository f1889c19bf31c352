"""Neuronpedia / circuit-tracer graph JSON: every field of the schema (metadata, qParams,
nodes, links) with its type, ids unique and consistent, and the adjacency round-trips."""

import json
from dataclasses import replace

import pytest
import torch

from bilinear_lens.circuits.graph import attribution_graph
from bilinear_lens.circuits.graph_export import FEATURE_TYPES, NODE_FIELDS, adjacency_from_json, graph_to_json, write_graph_json
from bilinear_lens.circuits.graph_prune import prune_graph
from fixtures.linearized_models import prompt, random_model

METADATA = {"slug": str, "scan": str, "transcoder_list": list, "prompt_tokens": list, "prompt": str, "schema_version": int}
QPARAMS = {"pinnedIds": list, "supernodes": list, "linkType": str, "clickedId": str, "sg_pos": str}
NODE_TYPES = {"node_id": str, "jsNodeId": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str,
              "token_prob": float, "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int, "clerp": str,
              "influence": float}  # fmt: skip


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_neuronpedia_schema(data: dict) -> None:
    """The constraints of Neuronpedia's graph validator (its webapp's ``graph-schema.json``,
    draft-07) restated: required keys, and the type of every optional key that is present."""
    meta = data["metadata"]
    assert {"slug", "scan", "prompt_tokens", "prompt"} <= set(meta) and isinstance(data["qParams"], dict)
    assert all(isinstance(t, str) for t in meta["prompt_tokens"])
    if "node_threshold" in meta:
        assert _is_number(meta["node_threshold"])
    for key, value in meta.get("pruning_settings", {}).items():
        assert _is_number(value), key
    info = meta.get("info", {})
    assert isinstance(info, dict) and isinstance(info.get("generator", {}), dict)
    assert all(isinstance(info["generator"].get(k, ""), str) for k in ("name", "version", "url", "email"))
    for node in data["nodes"]:
        assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId", "clerp"} <= set(node)
        assert node["feature"] is None or (isinstance(node["feature"], int) and not isinstance(node["feature"], bool))
        assert isinstance(node["layer"], (str, int)) and isinstance(node["ctx_idx"], int)
        assert all(isinstance(node[k], str) for k in ("node_id", "feature_type", "jsNodeId", "clerp"))
        assert all(node.get(k) is None or _is_number(node[k]) for k in ("influence", "activation"))
    for link in data["links"]:
        assert isinstance(link["source"], str) and isinstance(link["target"], str) and _is_number(link["weight"])
    # the loader (formatCLTGraphData) reads each logit's probability from its label, and needs a layer above 0
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert all(float(n["clerp"].split("(p=")[1].split(")")[0]) == pytest.approx(n["token_prob"], abs=5e-4) for n in logits)
    assert max(int(n["layer"]) for n in data["nodes"] if n["layer"] != "E" and n["feature_type"] != "logit") >= 1


@pytest.mark.parametrize("split", ["none", "neurons", "eigen"])
def test_exported_json_has_every_field(split, tmp_path):
    model, tokens = random_model(), prompt()
    graph = prune_graph(attribution_graph(model, tokens, split=split, top_k=2), node_threshold=0.7, edge_threshold=0.95)
    path = write_graph_json(graph, tmp_path / "graph.json", slug="fixture")
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    for fields, obj in ((METADATA, data["metadata"]), (QPARAMS, data["qParams"])):
        for name, kind in fields.items():
            assert isinstance(obj[name], kind), name
    assert data["metadata"]["slug"] == "fixture" and data["metadata"]["node_threshold"] == 0.7
    assert data["metadata"]["pruning_settings"] == {"node_threshold": 0.7, "edge_threshold": 0.95}
    check_neuronpedia_schema(data)
    assert data["metadata"]["prompt_tokens"] == graph.token_strings and data["metadata"]["schema_version"] == 1
    assert set(NODE_TYPES) <= set(NODE_FIELDS)
    for node in data["nodes"]:
        assert set(NODE_FIELDS) <= set(node), node
        for name, kind in NODE_TYPES.items():
            assert isinstance(node[name], kind), (name, node)
        assert node["feature_type"] in FEATURE_TYPES.values()
        assert node["activation"] is None or isinstance(node["activation"], float)
    ids = [n["node_id"] for n in data["nodes"]]
    assert len(set(ids)) == len(ids)
    frontend_keys = {(n["layer"], n["feature"], n["ctx_idx"]) for n in data["nodes"]}  # Neuronpedia's featureId
    assert len(frontend_keys) == len(ids)
    assert sum(n["is_target_logit"] for n in data["nodes"]) == 1
    by_type = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= by_type
    for node in data["nodes"]:
        if node["feature_type"] == "embedding":
            assert node["layer"] == "E" and node["node_id"] == f"E_{int(tokens[0, node['ctx_idx']])}_{node['ctx_idx']}"
        if node["feature_type"] == "logit":
            assert node["layer"] == str(graph.n_layers + 1) and 0 < node["token_prob"] <= 1
    for link in data["links"]:
        assert set(link) == {"source", "target", "weight"} and isinstance(link["weight"], float)
    read_ids, A = adjacency_from_json(data)
    assert read_ids == ids
    torch.testing.assert_close(A, graph.adjacency, rtol=0, atol=0)
    assert len(data["links"]) == graph.n_edges


def test_influence_of_an_unpruned_graph_is_computed():
    model, tokens = random_model(), prompt()
    graph = attribution_graph(model, tokens, target=(5, 7))
    data = graph_to_json(graph)
    assert "node_threshold" not in data["metadata"] and "pruning_settings" not in data["metadata"]
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"bias", "embedding"} <= kinds and 0 in [n["ctx_idx"] for n in data["nodes"] if n["feature_type"] == "embedding"]
    frontend_keys = {(n["layer"], n["feature"], n["ctx_idx"]) for n in data["nodes"]}  # Neuronpedia's featureId
    assert len(frontend_keys) == len(data["nodes"])
    check_neuronpedia_schema(data)
    influences = [n["influence"] for n in data["nodes"] if n["feature_type"] == "embedding"]
    assert all(i >= 0 for i in influences) and any(i > 0 for i in influences)
    assert data["metadata"]["info"]["exact"] is True


@pytest.mark.filterwarnings("ignore:no node of this graph below the logits")  # the pruned graph keeps layer 0 only
def test_index_takes_our_id_and_the_exported_id_and_pruning_keeps_the_numbering():
    """The two id formats (``L0.H1@3`` ours, ``0_1_3`` circuit-tracer's) name the same node;
    a pruned graph exports the same ids for the nodes it keeps as the unpruned graph does."""
    model, tokens = random_model(), prompt()
    graph = attribution_graph(model, tokens, split="neurons", top_k=2)
    data = graph_to_json(graph)
    for i, node in enumerate(data["nodes"]):
        assert graph.index(node["node_id"]) == i == graph.index(node["bilinear_lens_id"])
    whole = {n["bilinear_lens_id"]: n["node_id"] for n in data["nodes"]}
    pruned = prune_graph(graph, node_threshold=0.3, edge_threshold=0.9)
    # and a sub-graph without the last head of each layer (its head nodes then show one head
    # fewer than the model has: the neuron features must keep the whole graph's numbers)
    last_head = model.cfg.n_heads - 1
    keep = [i for i, n in enumerate(graph.nodes) if not (n.kind == "head" and n.index == last_head)]
    no_last_head = replace(graph, nodes=[graph.nodes[i] for i in keep], adjacency=graph.adjacency[keep][:, keep])
    for sub in (pruned, no_last_head):
        assert len(sub.nodes) < len(graph.nodes)
        for node in graph_to_json(sub)["nodes"]:
            assert whole[node["bilinear_lens_id"]] == node["node_id"]
    assert any(n.kind == "neuron" for n in no_last_head.nodes)
    with pytest.raises(KeyError, match=r"no node 'L9.H0@0' in the graph \(ids are GraphNode.node_id or the exported"):
        graph.index("L9.H0@0")


def test_logit_labels_are_circuit_tracers_and_a_one_layer_graph_warns():
    model, tokens = random_model(), prompt()
    graph = attribution_graph(model, tokens, target=5)  # one token: its probability is computed too
    logit = next(n for n in graph_to_json(graph)["nodes"] if n["feature_type"] == "logit")
    p = torch.softmax(model(tokens)[0, -1].double(), -1)[5].item()
    token = next(n.token for n in graph.nodes if n.kind == "logit")
    assert token is not None and logit["clerp"] == f'Output "{token}" (p={p:.3f})'
    assert logit["token_prob"] == pytest.approx(p, rel=1e-12)
    with pytest.warns(UserWarning, match="No layer found"):
        graph_to_json(attribution_graph(random_model(n_layers=1), tokens, target=5))
