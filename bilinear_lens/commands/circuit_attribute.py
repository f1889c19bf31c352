"""``bilinear-lens circuit attribute``: attribution patching with exactness diagnostics.

    bilinear-lens circuit attribute --checkpoint runs/tiny/final --clean " the cat was very happy" \\
        --corrupt " the cat was not happy" --logit-diff " happy" " sad" --kind mlp_in \\
        --method two_point [--freeze-patterns --freeze-norm-scales] [--check-exact] [--json] [--out scores.html]

Scores every node of ``--kind`` (the nodes of ``circuit patch``) by ``--method``: ``atp``
(gradient on the corrupted run times clean minus corrupted, TransformerLens' sign),
``two_point`` (trapezoid: exact when the metric is quadratic in the node, e.g. the last
MLP input without a final norm), ``gauss_legendre:K`` (integrated gradients at K points:
exact for a metric of degree 2K in the node) or ``exact`` (real patching).
``--freeze-patterns``/``--freeze-norm-scales`` hold attention patterns / norm scales at
their corrupted-run values (``--freeze-at clean`` for the clean run's): a bilinear model
is then a polynomial in any node. ``--check-exact`` also runs exact patching under the
same freezes and reports the largest gap. For ``--kind mlp_in`` on bilinear layers the
JSON carries the remainder ``delta^T Q(u) delta`` per node. Prompt, metric and output flags
are those of ``circuit patch``. Errors exit with code 2.
"""

from __future__ import annotations

import argparse
from typing import Optional

from bilinear_lens.commands.circuit_patch import add_kind_arguments, print_table, resolve_kind, top_cells
from bilinear_lens.commands.circuit_prompts import (
    add_prompt_arguments,
    check_out,
    load_patching_inputs,
    run_command,
    to_list,
    write_output,
)
from bilinear_lens.commands.common import (
    UsageError,
    add_device_args,
    add_direction_arguments,
    analysis_parser,
    require_positive,
)

COMMAND = "circuit attribute"


def build_parser() -> argparse.ArgumentParser:
    parser = analysis_parser(COMMAND, __doc__)
    add_prompt_arguments(parser)
    add_kind_arguments(parser)
    parser.add_argument("--method", default="atp", help="atp (default), two_point, gauss_legendre:K or exact")
    parser.add_argument("--freeze-patterns", action="store_true", help="hold attention patterns fixed")
    parser.add_argument("--freeze-norm-scales", action="store_true", help="hold every norm's scale fixed")
    parser.add_argument("--freeze-at", choices=("corrupted", "clean"), default="corrupted",
                        help="the run whose patterns/scales are held (default corrupted)")
    parser.add_argument("--check-exact", action="store_true", help="also run exact patching and report the largest gap")
    add_direction_arguments(parser)
    add_device_args(parser)
    return parser


def run(args: argparse.Namespace) -> dict:
    from bilinear_lens.circuits.attribution_patching import attribution_patching, parse_method
    from bilinear_lens.views.patching_view import PatchingHeatmap

    require_positive(args, "top", "max_batch", "k")
    check_out(args.out)
    try:
        parse_method(args.method)
    except ValueError as err:
        raise UsageError(f"--method {args.method!r}: {err}") from None
    model, clean, corrupted, label, metric, spec = load_patching_inputs(args, COMMAND)
    kind = resolve_kind(args, model, spec)
    common = dict(freeze_patterns=args.freeze_patterns, freeze_norm_scales=args.freeze_norm_scales,
                  freeze_at=args.freeze_at, max_batch=args.max_batch, progress=not args.quiet)
    result = attribution_patching(model, clean, corrupted, metric, kind, args.method, **common)
    mean = result.mean()
    payload = {
        "kind": result.kind, "method": result.method, "metric": label, "position": args.position,
        "frozen": {"patterns": args.freeze_patterns, "norm_scales": args.freeze_norm_scales, "at": args.freeze_at},
        "axis_names": result.axis_names, "shape": list(mean.shape), "n_prompts": int(clean.shape[0]),
        "metric_corrupted": to_list(result.metric_corrupted), "mean_score": to_list(mean),
        "scores": to_list(result.scores), "top": top_cells(mean, result.axis_names, args.top),
        "remainder": to_list(result.remainder),
    }
    if args.check_exact:
        exact = attribution_patching(model, clean, corrupted, metric, kind, "exact", **common)
        payload["exact_scores"] = to_list(exact.scores)
        payload["max_abs_gap_to_exact"] = float((result.scores - exact.scores).abs().max())
    if args.out:
        write_output(args.out, payload, PatchingHeatmap(mean, result.axis_names, title=f"{result.kind}: {result.method} on {label}"))
    return payload


def _print_text(args: argparse.Namespace, payload: dict) -> None:
    print_table(f"{payload['kind']}: {payload['method']} scores on {payload['metric']}, top {args.top}", payload["top"])
    if "max_abs_gap_to_exact" in payload:
        print(f"max |{payload['method']} - exact| = {payload['max_abs_gap_to_exact']:.3g}")


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(argv, build_parser(), run, COMMAND, _print_text)
