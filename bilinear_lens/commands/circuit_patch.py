"""``bilinear-lens circuit patch``: a batched activation-patching grid.

    bilinear-lens circuit patch --checkpoint runs/tiny/final --clean " the cat was very happy" \\
        --corrupt " the cat was not happy" --logit-diff " happy" " sad" --kind resid_pre [--json] [--out grid.html]

Caches the clean run, patches each cell of ``--kind`` (``resid_pre``, ``attn_head_out_by_pos``,
``mlp_in_eigen`` with ``--layer`` and ``--k``...) from the clean run into the corrupted run,
all cells stacked on the batch axis in chunks of ``--max-batch`` rows, and reports the
metric's change per cell: the logit of ``--token`` (or the logit difference of
``--logit-diff``) at ``--position``. Prompts are ``--clean``/``--corrupt`` texts (repeat
for several pairs) or ``--clean-ids``/``--corrupt-ids`` (comma-separated ids); they must
tokenize to one length (no padding). Prints the cells with the largest mean effect
(``--top``), or one JSON object with ``--json``: per-example values, the corrupted and clean
baselines, the mean effect and recovery ``(patched - corrupted) / (clean - corrupted)``.
``--out F.json`` writes that object, ``--out F.html`` an offline heatmap of the mean effect.
Errors exit with code 2.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch

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

COMMAND = "circuit patch"


def add_kind_arguments(parser: argparse.ArgumentParser) -> None:
    from bilinear_lens.circuits.patch_nodes import FAMILY_NAMES

    parser.add_argument("--kind", choices=FAMILY_NAMES, default="resid_pre", metavar="KIND",
                        help=f"what each cell patches (default resid_pre): {', '.join(FAMILY_NAMES)}")
    parser.add_argument("--layer", type=int, default=None, help="the bilinear layer of --kind mlp_in_eigen")
    parser.add_argument("--k", type=int, default=8,
                        help="top eigen-components of Q(u), u the metric's residual direction, for --kind mlp_in_eigen (default 8)")
    parser.add_argument("--max-batch", type=int, default=None, help="batch rows per forward (default: what 128 MiB of activations allow)")
    parser.add_argument("--top", type=int, default=10, help="cells to print (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--out", default=None, metavar="FILE", help="write .json (the result) or .html (a heatmap)")


def build_parser() -> argparse.ArgumentParser:
    parser = analysis_parser(COMMAND, __doc__)
    add_prompt_arguments(parser)
    add_kind_arguments(parser)
    add_direction_arguments(parser)
    add_device_args(parser)
    return parser


def resolve_kind(args: Any, model: Any, spec: Any) -> Any:
    """The family of ``--kind``; ``mlp_in_eigen`` is built for ``--layer`` and the metric's
    residual direction (``Q(u)`` of that layer for the logit or logit difference)."""
    if args.kind != "mlp_in_eigen":
        if args.layer is not None:
            raise UsageError(f"--layer applies to --kind mlp_in_eigen only, not --kind {args.kind}")
        return args.kind
    from bilinear_lens.circuits.patch_nodes import eigen_family
    from bilinear_lens.weights.directions import resolve_direction

    if args.layer is None:
        raise UsageError("--kind mlp_in_eigen needs --layer (a bilinear layer)")
    try:
        return eigen_family(model, args.layer, resolve_direction(model, spec), k=args.k)
    except ValueError as err:
        raise UsageError(f"--kind mlp_in_eigen --layer {args.layer} --k {args.k}: {err}") from None


def top_cells(values: torch.Tensor, axis_names: list[str], top: int) -> list[dict]:
    """The ``top`` cells of ``values`` (``[*axes]``) by ``|value|``, as ``{axis: index, value}``."""
    flat = values.reshape(-1)
    order = flat.abs().argsort(descending=True)[:top]
    rows = []
    for i in order.tolist():
        index = torch.unravel_index(torch.tensor(i), values.shape)
        rows.append({**{a: int(v) for a, v in zip(axis_names, index)}, "value": float(flat[i])})
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(title)
    for row in rows:
        cell = " ".join(f"{k}={v}" for k, v in row.items() if k != "value")
        print(f"  {cell:<36} {row['value']:+.6g}")


def run(args: argparse.Namespace) -> dict:
    from bilinear_lens.circuits.patching import patch_grid
    from bilinear_lens.views.patching_view import PatchingHeatmap

    require_positive(args, "top", "max_batch", "k")
    check_out(args.out)
    model, clean, corrupted, label, metric, spec = load_patching_inputs(args, COMMAND)
    kind = resolve_kind(args, model, spec)
    progress = not args.quiet
    grid = patch_grid(model, clean, corrupted, metric, kind, max_batch=args.max_batch,
                      progress=progress)
    effect = grid.effect().mean(-1)
    name = kind if isinstance(kind, str) else kind.name
    payload = {
        "kind": name, "metric": label, "position": args.position, "axis_names": grid.axis_names,
        "shape": list(grid.values.shape[:-1]), "n_prompts": int(clean.shape[0]),
        "baseline_corrupted": to_list(grid.baseline), "baseline_clean": to_list(grid.clean_baseline),
        "mean_effect": to_list(effect), "mean_recovery": to_list(grid.recovery().mean(-1)),
        "values": to_list(grid.values), "top": top_cells(effect, grid.axis_names, args.top),
    }
    if not isinstance(kind, str):
        payload["layer"], payload["eigenvalues"] = args.layer, to_list(kind.eigenvalues)
    if args.out:
        write_output(args.out, payload, PatchingHeatmap(effect, grid.axis_names, title=f"{name}: effect on {label}"))
    return payload


def _print_text(args: argparse.Namespace, payload: dict) -> None:
    print_table(f"{payload['kind']}: mean effect on {payload['metric']} (corrupted -> clean), top {args.top}",
                payload["top"])


def main(argv: Optional[list[str]] = None) -> int:
    return run_command(argv, build_parser(), run, COMMAND, _print_text)
