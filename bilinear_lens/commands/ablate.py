"""``bilinear-lens ablate``: the neurons of an MLP layer whose single ablation changes the loss most.

    bilinear-lens ablate --checkpoint runs/tiny/final --layer 0 --top 20 [--hook hook_post]
                         [--method zero|mean|resample] [--text-file F] [--n-texts 32] [--json]
                         [--token T | --token-id I | --logit-diff A B | --sae DIR --feature N]

Texts (``--text-file``: documents separated by blank lines, as in the training data's
``.txt`` files; default: the built-in synthetic stories) are tokenized with a BOS token
before each document, concatenated and cut into rows of ``--seq-len`` tokens, so no row is
padded. Every neuron is ablated on its own (:func:`bilinear_lens.activations.ablation.ablation_sweep`)
and the ``--top`` neurons by ``|delta loss|`` are printed, or one JSON object with
``--json``. With an output direction the ranking is by its change instead, averaged over
every position: ``delta_logit`` (a token), ``delta_logit_diff`` (a logit difference) or
``delta_feature`` (an SAE feature's mean activation at its hook,
:func:`bilinear_lens.sae.ablation.feature_ablation_sweep`). Errors (missing checkpoint, bad layer...) exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

import torch

from bilinear_lens.activations.ablation import METHODS, NEURON_HOOKS, NeuronTable, ablation_sweep
from bilinear_lens.commands.common import (
    UsageError,
    add_device_args,
    add_direction_arguments,
    analysis_parser,
    load_model_with_tokenizer,
    place_model,
    read_documents,
    require_positive,
    resolve_direction_arguments,
)
from bilinear_lens.models.hook_names import mlp_hook_name
from bilinear_lens.models.hook_names import UnknownHookError
from bilinear_lens.models.protocol import HookedModel



def build_parser() -> argparse.ArgumentParser:
    parser = analysis_parser("ablate", "Neuron ablation sweep: the neurons of an MLP layer whose single ablation changes the loss most.")
    parser.add_argument("--layer", type=int, default=0, help="block index (default 0)")
    parser.add_argument("--top", type=int, default=20, help="neurons to show (default 20)")
    parser.add_argument(
        "--hook", choices=NEURON_HOOKS, default="hook_post", help="MLP hook ablated (default hook_post)"
    )
    parser.add_argument("--method", choices=METHODS, default="zero", help="ablation method (default zero)")
    parser.add_argument("--text-file", help="UTF-8 documents separated by blank lines (default: synthetic stories)")
    parser.add_argument("--n-texts", type=int, default=32, help="documents to use (default 32)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row, at most n_ctx (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic-story and resample seed (default 0)")
    parser.add_argument("--ablations-per-pass", type=int, default=None, help="ablations batched per forward pass")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_direction_arguments(parser)
    add_device_args(parser)
    return parser


def _has_direction(args: argparse.Namespace) -> bool:
    return bool(args.token or args.token_id or args.logit_diff or args.logit_diff_id or args.sae or args.feature)


def _sweep(args: argparse.Namespace, model: Any, tokens: torch.Tensor) -> tuple[NeuronTable, str]:
    """The neuron table and the column it is ranked by (see module docstring)."""
    from bilinear_lens.weights.directions import FeatureDirection

    common = dict(hook=args.hook, method=args.method, seed=args.seed)
    spec = resolve_direction_arguments(args, model)[0][1] if _has_direction(args) else None
    if isinstance(spec, FeatureDirection):
        from bilinear_lens.sae.ablation import feature_ablation_sweep

        if args.feature_read != "decoder":
            raise UsageError("--feature-read has no effect on ablate: it measures the feature's activation")

        table = feature_ablation_sweep(model, tokens, args.layer, spec, ablations_per_pass=args.ablations_per_pass,
                                       progress=sys.stderr.isatty() and not args.quiet, **common)
        return table, "delta_feature"
    target = {} if spec is None else {"logit_diff": spec} if isinstance(spec, tuple) else {"logit": spec}
    table = ablation_sweep(model, tokens, args.layer, ablations_per_pass=args.ablations_per_pass,
                           progress=sys.stderr.isatty() and not args.quiet, position=None, **target, **common)
    by = "delta_loss" if spec is None else "delta_logit_diff" if isinstance(spec, tuple) else "delta_logit"
    return table, by


def _check_args(args: argparse.Namespace) -> None:
    require_positive(args, "top", "n_texts")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2 (the loss needs a next token), got {args.seq_len}")


def _read_texts(text_file: Optional[str], n_texts: int, seed: int) -> list[str]:
    if text_file is None:
        from bilinear_lens.data.synthetic import synthetic_stories

        return synthetic_stories(n_texts, seed=seed)
    return read_documents(text_file, n_texts)


def _pack_tokens(model: HookedModel, texts: list[str], seq_len: int) -> torch.Tensor:
    """``[n_rows, seq_len]``: BOS + document tokens, concatenated and cut (the tail dropped)."""
    tokenizer = model.tokenizer
    seq_len = min(seq_len, model.cfg.n_ctx)
    stream: list[int] = []
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    for text in texts:
        stream.extend(bos)
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
    n_rows = len(stream) // seq_len
    if n_rows == 0:
        raise UsageError(f"the texts hold {len(stream)} tokens, fewer than one row of --seq-len {seq_len}")
    return torch.tensor(stream[: n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


def _report(args: argparse.Namespace, tokens: torch.Tensor, table: NeuronTable, by: str) -> dict[str, Any]:
    top = table.top(args.top, by=by)
    return {
        "checkpoint": str(args.checkpoint),
        "layer": args.layer,
        "hook": mlp_hook_name(args.layer, args.hook),
        "method": args.method,
        "n_neurons": len(table),
        "tokens": list(tokens.shape),
        "baseline_loss": table.baseline["loss"],
        "ranked_by": by,
        "neurons": [{"rank": rank, **row} for rank, row in enumerate(top.rows(), start=1)],
    }


def _print_table(report: dict[str, Any]) -> None:
    rows, seq_len = report["tokens"]
    print(
        f"{report['hook']}: {report['method']} ablation of each of {report['n_neurons']} neurons "
        f"on {rows} x {seq_len} tokens; baseline loss {report['baseline_loss']:.4f}"
    )
    by = report["ranked_by"]
    columns = [by] + (["delta_loss"] if by != "delta_loss" else [])
    print(f"{'rank':>5}  {'neuron':>6}  " + "  ".join(f"{c:>16}" for c in columns))
    for row in report["neurons"]:
        print(f"{row['rank']:>5}  {row['neuron']:>6}  " + "  ".join(f"{row[c]:>+16.6f}" for c in columns))


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        model = place_model(load_model_with_tokenizer(args.checkpoint, "ablate"), args)
        tokens = _pack_tokens(model, _read_texts(args.text_file, args.n_texts, args.seed), args.seq_len)
        tokens = tokens.to(model.W_U.device)
        table, by = _sweep(args, model, tokens)
    except (UsageError, UnknownHookError, ValueError, TypeError) as err:
        print(f"bilinear-lens ablate: error: {err}", file=sys.stderr)
        return 2
    report = _report(args, tokens, table, by)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
