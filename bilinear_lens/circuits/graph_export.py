"""Attribution graphs as Neuronpedia / circuit-tracer graph JSON, so they open in those
frontends from another environment.

What we write (circuit-tracer's ``frontend/graph_models.py`` fields; schema_version 1):

- ``metadata``: ``slug``, ``scan``, ``transcoder_list`` (``[]``: no transcoders),
  ``prompt_tokens`` (decoded tokens), ``prompt`` (their concatenation), ``schema_version``,
  ``info`` (``generator`` as ``{name, version}``; ours: split, exactness, target value), and for a
  pruned graph ``node_threshold`` and ``pruning_settings`` (``node_threshold``, ``edge_threshold``).
  Optional fields are left out rather than written ``null`` where Neuronpedia's graph schema
  (``apps/webapp/app/api/graph/graph-schema.json``) types them as numbers or objects.
- ``qParams``: ``pinnedIds``, ``supernodes``, ``linkType``, ``clickedId``, ``sg_pos`` (empty).
- ``nodes``: ``node_id``, ``jsNodeId`` (= ``node_id``), ``feature``, ``layer`` (a string),
  ``ctx_idx``, ``feature_type``, ``token_prob``, ``is_target_logit``, ``run_idx``,
  ``reverse_ctx_idx``, ``clerp`` (our label; a logit's is circuit-tracer's ``Output "TOKEN" (p=P)``,
  which Neuronpedia's loader parses), ``influence``, ``activation``; and ours:
  ``value`` (the node's share of the target) and ``bilinear_lens_id`` (:attr:`GraphNode.node_id`,
  e.g. ``L0.H1@3``, a different format from ``node_id``; ``AttributionGraph.index`` takes either).
- ``links``: ``source``, ``target``, ``weight`` (the edge ``A[target, source]``).

Ids follow circuit-tracer: ``E_{token}_{pos}`` for embeddings (layer ``"E"``),
``{n_layers + 1}_{token}_{pos}`` for logits, ``{layer}_{feature}_{pos}`` otherwise, with
``feature`` = head index for heads, ``n_heads`` for an unsplit MLP, ``n_heads + 1 + i`` for
neuron / eigen-component / SAE feature ``i``, ``-1`` / ``-2`` for the remainder / residual nodes. Feature
types: ``embedding``, ``logit``, ``mlp reconstruction error`` (remainder and residual nodes,
drawn as circuit-tracer's error nodes), and ours for the rest: ``attention head``, ``mlp``,
``mlp neuron``, ``mlp eigen-component``, ``sae feature``, ``bias`` (id ``B_0_0``, layer ``"E"``, ctx 0,
feature -1). ``(layer, feature, ctx_idx)`` is unique per node: the Neuronpedia frontend keys its
features by it (an embedding at position 0 is ``E``, 0, 0, so the bias is not).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch

from bilinear_lens import __version__

SCHEMA_VERSION = 1
FEATURE_TYPES = {
    "embedding": "embedding",
    "logit": "logit",
    "bias": "bias",
    "head": "attention head",
    "mlp": "mlp",
    "neuron": "mlp neuron",
    "eigen": "mlp eigen-component",
    "sae_feature": "sae feature",
    "mlp_rest": "mlp reconstruction error",
    "mlp_residual": "mlp reconstruction error",
}
NODE_FIELDS = ("node_id", "jsNodeId", "feature", "layer", "ctx_idx", "feature_type", "token_prob", "is_target_logit",
               "run_idx", "reverse_ctx_idx", "clerp", "influence", "activation")  # fmt: skip


def _feature(node: Any, n_heads: int) -> int:
    return {"head": node.index, "mlp": n_heads, "neuron": n_heads + 1 + node.index, "eigen": n_heads + 1 + node.index,
            "sae_feature": n_heads + 1 + node.index, "mlp_rest": -1, "mlp_residual": -2, "embedding": node.position, "logit": node.index, "bias": -1}[node.kind]  # fmt: skip


def export_node_id(node: Any, n_layers: int, n_heads: int) -> str:
    """The circuit-tracer style id of ``node`` (see module docstring)."""
    if node.kind == "embedding":
        return f"E_{node.index}_{node.position}"
    if node.kind == "bias":
        return "B_0_0"
    if node.kind == "logit":
        return f"{n_layers + 1}_{node.index}_{node.position}"
    return f"{node.layer}_{_feature(node, n_heads)}_{node.position}"


def _clerp(node: Any) -> str:
    """The node's label; a logit's as circuit-tracer writes it, ``Output "TOKEN" (p=P)``: the
    Neuronpedia frontend reads the probability after ``(p=`` and fails to load a graph whose
    logit label lacks it."""
    if node.kind != "logit":
        return node.label
    return f'Output "{node.token if node.token is not None else node.label}" (p={float(node.activation or 0.0):.3f})'


def _warn_single_layer(graph: Any) -> None:
    """Warn where no node below the logits sits above layer 0: Neuronpedia's loader takes the
    highest such layer and stops with "No layer found" when it is 0 (a 1-layer model)."""
    if all(n.kind == "logit" or n.layer < 1 for n in graph.nodes):
        warnings.warn("no node of this graph below the logits sits above layer 0 (a 1-layer model, or pruning kept "
                      "no later layer): Neuronpedia's graph loader refuses such a file ('No layer found'); open it in "
                      "GraphView (HTML) instead",
                      stacklevel=3)


def graph_n_heads(graph: Any) -> int:
    """Heads per layer (``feature`` numbering needs it): as recorded when the graph was built,
    so a pruned graph that lost its last heads numbers its MLP features as the whole one did;
    else (a graph built by hand) as its head nodes show them."""
    if graph.meta.get("n_heads") is not None:
        return int(graph.meta["n_heads"])
    return 1 + max((n.index for n in graph.nodes if n.kind == "head"), default=-1)


def graph_to_json(graph: Any, slug: str = "bilinear-lens-graph", scan: str = "bilinear-lens", n_heads: Optional[int] = None) -> dict[str, Any]:
    """The graph as a Neuronpedia / circuit-tracer JSON object (a dict; see module docstring).
    ``influence``: from pruning when the graph was pruned, else its own influence."""
    from bilinear_lens.circuits.graph_prune import influence, normalize_rows

    if n_heads is None:
        n_heads = graph_n_heads(graph)
    influences = graph.meta.get("influence")
    if influences is None:
        influences = influence(normalize_rows(graph.adjacency), graph.target_weights).tolist()
    _warn_single_layer(graph)
    ids = [export_node_id(n, graph.n_layers, n_heads) for n in graph.nodes]
    top_logit = max((i for i, n in enumerate(graph.nodes) if n.kind == "logit"),
                    key=lambda i: graph.nodes[i].activation or 0.0, default=None)  # fmt: skip
    nodes = []
    for i, (node, node_id) in enumerate(zip(graph.nodes, ids)):
        nodes.append({
            "node_id": node_id, "jsNodeId": node_id, "feature": _feature(node, n_heads),
            "layer": "E" if node.kind in ("embedding", "bias") else str(graph.n_layers + 1) if node.kind == "logit" else str(node.layer),
            "ctx_idx": max(node.position, 0), "feature_type": FEATURE_TYPES[node.kind],
            "token_prob": float(node.activation or 0.0) if node.kind == "logit" else 0.0,
            "is_target_logit": i == top_logit, "run_idx": 0, "reverse_ctx_idx": 0,
            "clerp": _clerp(node), "influence": float(influences[i]),
            "activation": None if node.activation is None else float(node.activation),
            "value": float(node.value),  # ours: the node's exact share of the target
            "bilinear_lens_id": node.node_id,  # ours: GraphNode.node_id (AttributionGraph.index takes either)
        })  # fmt: skip
    A = graph.adjacency
    links = [{"source": ids[s], "target": ids[t], "weight": float(A[t, s])} for t, s in (A != 0).nonzero().tolist()]
    metadata = {
        "slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": list(graph.token_strings),
        "prompt": "".join(graph.token_strings), "schema_version": SCHEMA_VERSION,
        "info": {"generator": {"name": "bilinear-lens", "version": __version__}, "split": graph.split,
                 "exact": graph.exact, "target_value": graph.target_value},
        **_pruning_metadata(graph.meta),
    }  # fmt: skip
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


def _pruning_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """``node_threshold`` and ``pruning_settings`` of a pruned graph; nothing for an unpruned
    one (Neuronpedia's schema types them as numbers: a ``null`` there fails its validator)."""
    settings = {k: meta[k] for k in ("node_threshold", "edge_threshold") if meta.get(k) is not None}
    if not settings:
        return {}
    head = {"node_threshold": settings["node_threshold"]} if "node_threshold" in settings else {}
    return {**head, "pruning_settings": settings}


def write_graph_json(graph: Any, path: Union[str, Path], **kwargs: Any) -> Path:
    """:func:`graph_to_json` written to ``path`` atomically (temp file + rename)."""
    from bilinear_lens.files.atomic import atomic_write_text

    return atomic_write_text(path, json.dumps(graph_to_json(graph, **kwargs)))


def adjacency_from_json(data: dict[str, Any]) -> tuple[list[str], torch.Tensor]:
    """Node ids and the ``[n, n]`` adjacency (``A[target, source]``) read back from graph JSON."""
    ids = [n["node_id"] for n in data["nodes"]]
    ix = {node_id: i for i, node_id in enumerate(ids)}
    A = torch.zeros(len(ids), len(ids), dtype=torch.float64)
    for link in data["links"]:
        A[ix[link["target"]], ix[link["source"]]] = link["weight"]
    return ids, A
