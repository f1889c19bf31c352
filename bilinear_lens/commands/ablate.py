"""``bilinear-lens ablate``: the neurons of an MLP layer whose single ablation changes the loss most.

    bilinear-lens ablate --checkpoint runs/tiny/final --layer 0 --top 20 [--hook hook_post]
                         [--method zero|mean|resample] [--text-file F] [--n-texts 32] [--json]
                         [--token T | --token-id I | --logit-diff A B | --sae DIR --feature N]

The first ``--n-texts`` documents (default 32) of ``--text-file`` (documents found by
``--documents``, training's rule: ``<|endoftext|>`` lines when present, else the whole
file; without it, the validation documents of the corpus the checkpoint was trained on, as
its ``run_config.toml`` records, or synthetic stories when it records none: the output
says which; :mod:`bilinear_lens.training.measured_text`, the rule the report and the
notebooks use too) become one token stream, a BOS token before each document, as training
packs its corpus; the stream is cut into rows of ``--seq-len`` tokens (default 64, at most the
model's n_ctx: a longer one is refused). Every token of those documents counts and no row
is padded: when the stream does not divide into rows, the last row is its final
``--seq-len`` tokens, re-reading ``overlap`` tokens of the row before (the JSON's
``stream_tokens``, ``overlap``, ``n_documents`` and ``documents_in_file``).
Documents are read and tokenized one at a time, and only the first ``--max-tokens`` text
tokens (default 16384; BOS not counted, as in ``polytope``) are used: reading stops there,
so a huge document or ``--n-texts`` costs no more than the cap (the JSON's ``max_tokens``
and ``capped``; the table's header says when the cap cut the text). Running out of memory
anyway is a one-line error (exit 1) saying to lower ``--max-tokens``.

Every neuron is ablated on its own and the ``--top`` neurons by the magnitude
``|delta_loss|`` (either sign) are printed, or one JSON object with ``--json``
(``"ranked_by": "|delta_loss|"``, ``"rank_column": "delta_loss"``). With an output
direction the ranking is by the magnitude of its change instead, averaged over every
position: ``|delta_logit|`` (a token), ``|delta_logit_diff|`` (a logit difference) or
``|delta_feature|`` (an SAE feature's mean activation at its hook). Each loss / logit effect
comes with its standard error clustered by document (``delta_X_se``: the tokens of one
document are not independent samples, documents are;
:mod:`bilinear_lens.activations.ablation.uncertainty`), a two-sided p-value (``delta_X_p``)
and its Benjamini-Hochberg q-value over every neuron of the layer (``delta_X_q``): the
layer's neurons are tested together, so an effect counts as distinguishable from zero at
``q < --fdr`` (default 0.05), not at an unadjusted 2 standard errors, under which about 5 %
of null neurons would pass. A ranked effect that is not is marked ``~0`` (JSON
``"distinguishable": false``) and the header says how many neurons of the layer are
distinguishable at all, so a ranking of noise reads as one. Errors (missing checkpoint, bad
layer, ``--seq-len`` above n_ctx...) exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Optional

import torch

from bilinear_lens.activations.ablation import METHODS, NEURON_HOOKS, NeuronTable, ablation_sweep
from bilinear_lens.activations.ablation.uncertainty import DEFAULT_FDR
from bilinear_lens.commands.common import (
    EXIT_FAILURE,
    UsageError,
    add_device_args,
    add_direction_arguments,
    analysis_parser,
    load_model_with_tokenizer,
    place_model,
    report_error,
    require_positive,
    resolve_direction_arguments,
    warn_special_token_text,
)
from bilinear_lens.commands.measured_text import add_measured_text_arguments, measured_rows
from bilinear_lens.models.hook_names import UnknownHookError, mlp_hook_name
from bilinear_lens.training.measured_text import DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN  # noqa: F401 (re-exported)


def build_parser() -> argparse.ArgumentParser:
    parser = analysis_parser("ablate", __doc__)
    parser.add_argument("--layer", type=int, default=0, help="block index (default 0)")
    parser.add_argument("--top", type=int, default=20, help="neurons to show (default 20)")
    parser.add_argument(
        "--hook", choices=NEURON_HOOKS, default="hook_post", help="MLP hook ablated (default hook_post)"
    )
    parser.add_argument("--method", choices=METHODS, default="zero", help="ablation method (default zero)")
    add_measured_text_arguments(parser)
    parser.add_argument("--ablations-per-pass", type=int, default=None, help="ablations batched per forward pass")
    parser.add_argument("--fdr", type=float, default=DEFAULT_FDR,
                        help="false discovery rate: an effect is distinguishable from zero at Benjamini-Hochberg "
                        f"q below it, over the layer's neurons (default {DEFAULT_FDR:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    add_direction_arguments(parser)
    add_device_args(parser)
    return parser


def _has_direction(args: argparse.Namespace) -> bool:
    return bool(args.token or args.token_id or args.logit_diff or args.logit_diff_id or args.sae or args.feature)


def _direction(args: argparse.Namespace, model: Any) -> Any:
    """The output direction the flags name (``None``: rank by the loss); usage errors here,
    before any text is read."""
    from bilinear_lens.weights.directions import FeatureDirection

    spec = resolve_direction_arguments(args, model)[0][1] if _has_direction(args) else None
    if isinstance(spec, FeatureDirection) and args.feature_read != "decoder":
        raise UsageError("--feature-read has no effect on ablate: it measures the feature's activation")
    return spec


def _sweep(args: argparse.Namespace, model: Any, tokens: torch.Tensor, spec: Any,
           documents: Optional[torch.Tensor] = None) -> tuple[NeuronTable, str]:
    """The neuron table and the column whose magnitude ranks it (see module docstring);
    ``documents``: each token's document, the clusters of the standard errors."""
    from bilinear_lens.weights.directions import FeatureDirection

    common = dict(hook=args.hook, method=args.method, seed=args.seed)
    if isinstance(spec, FeatureDirection):
        from bilinear_lens.sae.ablation import feature_ablation_sweep

        table = feature_ablation_sweep(model, tokens, args.layer, spec, ablations_per_pass=args.ablations_per_pass,
                                       progress=not args.quiet, documents=documents, **common)
        return table, "delta_feature"
    target = {} if spec is None else {"logit_diff": spec} if isinstance(spec, tuple) else {"logit": spec}
    table = ablation_sweep(model, tokens, args.layer, ablations_per_pass=args.ablations_per_pass,
                           progress=not args.quiet, position=None, documents=documents, **target, **common)
    by = "delta_loss" if spec is None else "delta_logit_diff" if isinstance(spec, tuple) else "delta_logit"
    return table, by


def _check_args(args: argparse.Namespace) -> None:
    require_positive(args, "top", "n_texts", "ablations_per_pass", "max_tokens")
    if not 0 < args.fdr < 1:
        raise UsageError(f"--fdr must be in (0, 1) (a false discovery rate), got {args.fdr}")


def _report(args: argparse.Namespace, tokens: torch.Tensor, stream_tokens: int, overlap: int,
            table: NeuronTable, by: str) -> dict[str, Any]:
    top = table.top(args.top, by=by)
    se, q = f"{by}_se", f"{by}_q"
    rows = [{"rank": rank, **row} for rank, row in enumerate(top.rows(), start=1)]
    for row in rows:
        for name, value in row.items():  # NaN (one document: no spread) is JSON null
            if isinstance(value, float) and math.isnan(value):
                row[name] = None
        if q in row:
            row["distinguishable"] = None if row[q] is None else row[q] < args.fdr
    n_clear = int((table[q] < args.fdr).sum()) if q in table.columns else None
    return {
        "checkpoint": str(args.checkpoint),
        "layer": args.layer,
        "hook": mlp_hook_name(args.layer, args.hook),
        "method": args.method,
        "n_neurons": len(table),
        "tokens": list(tokens.shape),
        "stream_tokens": stream_tokens,
        "overlap": overlap,
        "baseline_loss": table.baseline["loss"],
        "ranked_by": f"|{by}|",
        "rank_column": by,
        "se_column": se if se in table.columns else None,
        "q_column": q if q in table.columns else None,
        "fdr": args.fdr,
        "clusters": table.uncertainty.get("clusters"),
        "n_clusters": table.uncertainty.get("n_clusters", {}).get(by.removeprefix("delta_")),
        "n_distinguishable": n_clear,
        "neurons": rows,
    }


def _documents(report: dict[str, Any]) -> str:
    """``"32 of the file's 40 documents (--n-texts 32)"``, ``"all 5 documents of the file"``
    or ``"32 synthetic stories"``, then whether ``--max-tokens`` cut the text."""
    n, in_file = report["n_documents"], report["documents_in_file"]
    cap = f", capped at --max-tokens {report['max_tokens']} text tokens" if report.get("capped") else ""
    if in_file is None:
        return f"{n} document{'' if n == 1 else 's'}{cap}"
    if n == in_file and not report.get("capped"):
        return "the file's only document" if n == 1 else f"all {n} documents of the file"
    return f"{n} of the file's {in_file} document{'' if in_file == 1 else 's'} (--n-texts {report['n_texts']}){cap}"


def _clusters(report: dict[str, Any]) -> str:
    """``"document (24 documents)"`` or ``"row (16 rows)"``: what the standard errors treat
    as independent samples."""
    kind, n = ("document", "documents") if report["clusters"] == "documents" else ("row", "rows")
    return f"{kind} ({report['n_clusters']} {n})"


def _print_table(report: dict[str, Any]) -> None:
    rows, seq_len = report["tokens"]
    overlap = f"; the last row re-reads {report['overlap']} tokens of the row before" if report["overlap"] else ""
    print(
        f"{report['hook']}: {report['method']} ablation of each of {report['n_neurons']} neurons "
        f"on {rows} x {seq_len} tokens ({_documents(report)}, {report['stream_tokens']} tokens with a BOS before each{overlap}); "
        f"baseline loss {report['baseline_loss']:.4f}; ranked by {report['ranked_by']}"
    )
    print(f"measured on {report['measured_on']}")
    by, se, q = report["rank_column"], report["se_column"], report["q_column"]
    columns = [by] + ([se, q] if se else []) + (["delta_loss"] if by != "delta_loss" else [])
    if se:
        print(f"distinguishable from zero: {report['n_distinguishable']} of {report['n_neurons']} neurons "
              f"(Benjamini-Hochberg q < {report['fdr']:g} over the layer's {report['n_neurons']} neurons; standard "
              f"errors clustered by {_clusters(report)}); '~0' marks a ranked effect that is not")
    print(f"{'rank':>5}  {'neuron':>6}  " + "  ".join(f"{c:>16}" for c in columns))
    for row in report["neurons"]:
        # effects carry their sign; a standard error is >= 0 and printed without one
        cells = "  ".join(f"{'nan':>16}" if row[c] is None else f"{row[c]:>16.6f}" if c in (se, q) else f"{row[c]:>+16.6f}"
                          for c in columns)
        mark = "  ~0" if row.get("distinguishable") is False else ""
        print(f"{row['rank']:>5}  {row['neuron']:>6}  {cells}{mark}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        model = place_model(load_model_with_tokenizer(args.checkpoint, "ablate"), args)
        spec = _direction(args, model)
        warn_special_token_text(model.tokenizer, args.text_file, "ablate", args.documents)
        measured = measured_rows(args, model, progress=not args.quiet)
        tokens = measured.rows.to(model.W_U.device)
        table, by = _sweep(args, model, tokens, spec, measured.document_ids)
    except (UsageError, UnknownHookError, ValueError, TypeError) as err:
        return report_error("ablate", err)
    except MemoryError:  # valid inputs, too large for this machine
        return report_error("ablate", f"out of memory ablating {args.max_tokens} tokens (--max-tokens) of "
                            f"--n-texts {args.n_texts} documents; lower --max-tokens or --ablations-per-pass", EXIT_FAILURE)
    report = _report(args, tokens, measured.stream_tokens, measured.overlap, table, by)
    report.update(n_documents=measured.n_documents, documents_in_file=measured.text.documents_in_source,
                  n_texts=args.n_texts, max_tokens=args.max_tokens, capped=measured.capped,
                  text=measured.text.to_dict(measured.n_documents), measured_on=measured.describe())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
