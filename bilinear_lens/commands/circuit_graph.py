"""``bilinear-lens circuit graph``: the attribution graph of one prompt, without transcoders.

Nodes are the token embeddings, each attention head's write and each MLP's write per
position (optionally split into its top neurons or top eigen-components of ``Q(g)``), a
bias node and the targets; edges are exact direct effects in the model linearized at the
prompt (attention patterns and norm scales frozen, bilinear MLPs split symmetrically), so
each node's value is the sum of its incoming edges. The graph is pruned by influence
(``--node-threshold``, ``--edge-threshold``) and written as a self-contained HTML view
(``--out graph.html``) or Neuronpedia / circuit-tracer graph JSON (``--out graph.json``).

The target is the output direction given (``--token``, ``--logit-diff``, ``--sae
--feature``, ...) or, without one, the most likely next tokens up to ``--cumulative-prob``,
weighted by probability. Exact for the observed forward (not for counterfactuals through the
softmax or the norms); non-bilinear MLPs are refused unless ``--allow-inexact``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from bilinear_lens.commands.circuit_prompts import add_one_prompt_arguments
from bilinear_lens.commands.common import (
    UsageError,
    add_device_args,
    add_direction_arguments,
    analysis_parser,
    place_model,
    report_error,
    require_positive,
    resolve_direction_arguments,
)

COMMAND = "circuit graph"
OUT_SUFFIXES = (".html", ".json")


def build_parser() -> argparse.ArgumentParser:
    p = analysis_parser(COMMAND, __doc__)
    add_one_prompt_arguments(p, "the prompt as text (tokenized with the checkpoint's tokenizer)")
    add_direction_arguments(p)
    p.add_argument("--cumulative-prob", type=float, default=0.95,
                   help="without a direction: top next tokens until their probability reaches this (default 0.95)")
    p.add_argument("--max-logits", type=int, default=10, help="at most this many logit targets (default 10)")
    p.add_argument("--position", type=int, default=-1, help="position whose output is the target (default -1, the last)")
    p.add_argument("--split", choices=("none", "eigen", "neurons", "sae"), default="none",
                   help="MLP nodes: one per position (none), top eigen-components of Q(g), top neurons, or top SAE features")
    p.add_argument("--mlp-sae", action="append", default=[], metavar="DIR",
                   help="with --split sae: an SAE on blocks.L.hook_mlp_out (repeatable, one per layer)")
    p.add_argument("--top-k", type=int, default=4, help="components / neurons per MLP and position with --split (default 4)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="cumulative node influence kept (default 0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="cumulative edge score kept (default 0.98)")
    p.add_argument("--chunk-size", type=int, default=64, help="target nodes per batched backward (default 64)")
    p.add_argument("--allow-inexact", action="store_true", help="build graphs of non-bilinear MLPs too, flagged approximate")
    p.add_argument("--out", help="write the pruned graph: graph.html (view) or graph.json (Neuronpedia / circuit-tracer)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    add_device_args(p, dtypes=("float32", "float64"))
    return p


def _check_args(args: argparse.Namespace) -> None:
    require_positive(args, "top_k", "chunk_size", "max_logits")
    for flag in ("node_threshold", "edge_threshold"):
        value = getattr(args, flag)
        if not 0 <= value <= 1:
            raise UsageError(f"--{flag.replace('_', '-')} must lie in [0, 1], got {value}")
    if not 0 < args.cumulative_prob <= 1:
        raise UsageError(f"--cumulative-prob must lie in (0, 1], got {args.cumulative_prob}")
    if args.out is not None:
        suffix = Path(args.out).suffix.lower()
        if suffix not in OUT_SUFFIXES:
            raise UsageError(f"--out {args.out!r} must end in .html or .json, got {suffix or 'no suffix'!r}")
        if Path(args.out).is_dir():
            raise UsageError(f"--out {args.out!r} is a directory")


def _load(args: argparse.Namespace) -> Any:
    from bilinear_lens.commands.common import load_model_with_tokenizer
    from bilinear_lens.files.serialized import CheckpointError
    from bilinear_lens.models.model import BilinearTransformer

    if args.text is not None:
        model = load_model_with_tokenizer(args.checkpoint, COMMAND)
    else:
        try:
            model = BilinearTransformer.from_pretrained(args.checkpoint).eval()
        except (FileNotFoundError, CheckpointError, ValueError) as err:
            raise UsageError(f"cannot load checkpoint {args.checkpoint}: {err}") from err
    return place_model(model, args)


def _mlp_saes(args: argparse.Namespace, model: Any) -> Optional[dict[int, Any]]:
    """``{layer: SAE}`` from ``--mlp-sae`` (layer read from each SAE's hook name)."""
    import re

    from bilinear_lens.commands.common import load_sae_argument

    if (args.split == "sae") != bool(args.mlp_sae):
        raise UsageError("--split sae and --mlp-sae go together: SAEs on blocks.L.hook_mlp_out")
    saes: dict[int, Any] = {}
    for path in args.mlp_sae:
        sae = load_sae_argument(path, model, flag="--mlp-sae")
        match = re.fullmatch(r"blocks\.(\d+)\.hook_mlp_out", sae.cfg.hook_name)
        if match is None:
            raise UsageError(f"--mlp-sae {path}: it reads {sae.cfg.hook_name!r}, not a blocks.L.hook_mlp_out")
        if int(match.group(1)) in saes:
            raise UsageError(f"--mlp-sae {path}: a second SAE for layer {match.group(1)}")
        saes[int(match.group(1))] = sae
    return saes or None


def summary(graph: Any, pruned: Any, seconds: float, out: Optional[str]) -> dict[str, Any]:
    """What ``--json`` prints."""
    kinds: dict[str, int] = {}
    for node in pruned.nodes:
        kinds[node.kind] = kinds.get(node.kind, 0) + 1
    return {
        "prompt_tokens": graph.token_strings, "targets": [{"label": t.label, "weight": t.weight, "token_id": t.token_id,
                                                           "position": t.position} for t in graph.targets],
        "target_value": graph.target_value, "exact": graph.exact, "completeness_error": graph.completeness_error(),
        "split": graph.split, "nodes": len(graph.nodes), "edges": graph.n_edges,
        "pruned_nodes": len(pruned.nodes), "pruned_edges": pruned.n_edges, "pruned_node_kinds": kinds,
        "seconds": seconds, "out": out,
    }  # fmt: skip


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bilinear_lens.circuits.graph import attribution_graph, direction_target
    from bilinear_lens.circuits.graph_prune import prune_graph

    try:
        _check_args(args)
        model = _load(args)
        found = resolve_direction_arguments(args, model, required=False)
        saes = _mlp_saes(args, model)
        tokens = model.to_tokens(args.text) if args.text is not None else args.ids
        n_pos = len(tokens[0]) if args.text is not None else len(tokens)
        if not -n_pos <= args.position < n_pos:
            raise UsageError(f"--position {args.position} is out of range for a prompt of {n_pos} tokens")
        start = time.perf_counter()
        target = direction_target(model, found[0][1], args.position) if found else None
        graph = attribution_graph(model, tokens, target, cumulative_prob=args.cumulative_prob,
                                  max_targets=args.max_logits, position=args.position, split=args.split, top_k=args.top_k,
                                  exact=not args.allow_inexact, chunk_size=args.chunk_size, progress=not args.quiet, saes=saes)  # fmt: skip
        pruned = prune_graph(graph, args.node_threshold, args.edge_threshold)
        seconds = time.perf_counter() - start
    except (UsageError, ValueError, TypeError) as err:
        return report_error(COMMAND, err)
    try:
        if args.out is not None:
            if args.out.lower().endswith(".json"):
                from bilinear_lens.circuits.graph_export import write_graph_json

                write_graph_json(pruned, args.out, slug=Path(args.out).stem)
            else:
                from bilinear_lens.views.graph_view import GraphView

                GraphView(pruned, title=f"Attribution graph ({Path(args.checkpoint).name})").save(args.out)
    except OSError as err:
        return report_error(COMMAND, err, code=1)
    info = summary(graph, pruned, seconds, args.out)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        targets = ", ".join(f"{t['label']} (w {t['weight']:.3g})" for t in info["targets"])
        print(f"target {targets}: value {graph.target_value:+.4g} ({'exact' if graph.exact else 'APPROXIMATE'}, "
              f"completeness error {info['completeness_error']:.2g})")  # fmt: skip
        print(f"graph: {info['nodes']} nodes, {info['edges']} edges in {seconds:.2f} s; pruned: "
              f"{info['pruned_nodes']} nodes, {info['pruned_edges']} edges")  # fmt: skip
        if args.out:
            print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
