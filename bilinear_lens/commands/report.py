"""``bilinear-lens report``: one self-contained HTML page for a checkpoint's layer.

Output directions (``--token``/``--token-id``, repeatable; ``--sae DIR --feature N``,
repeatable) each get an eigendecomposition section; ``--logit-diff`` picks the direction of
the interaction heat map between the ``--input-token``s. Tokens you name must each be one
token (the same rule as ``eigen``); only the built-in defaults are skipped when a
vocabulary splits them. ``--dtype`` is float32 or float64 (the eigendecompositions have no
half-precision kernel). Exit status: 2 for a usage or input error, 1 when the page cannot
be written.

The losses (neuron ablation table, rank-k check) are measured on the rows ``ablate`` measures
on with the same flags (``--text-file``, ``--documents``, ``--n-texts``, ``--max-tokens``,
``--seq-len``, ``--seed``; :func:`~bilinear_lens.training.measured_text.measured_rows`), so
the page's ablation table is the one ``bilinear-lens ablate`` prints; the first
:data:`SHOWN_TEXTS` of those documents are shown token by token.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from bilinear_lens.commands.common import (
    EIGH_DTYPES,
    EXIT_FAILURE,
    UsageError,
    add_device_args,
    add_direction_arguments,
    analysis_parser,
    place_model,
    report_error,
    require_positive,
    resolve_direction_arguments,
    resolve_input_token_arguments,
)
from bilinear_lens.commands.measured_text import add_measured_text_arguments, measured_rows
from bilinear_lens.files.serialized import CheckpointError

# Documents shown token by token (attention, eigenvector activations): a page per text.
SHOWN_TEXTS = 8


def build_parser() -> argparse.ArgumentParser:
    p = analysis_parser("report", __doc__)
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--layer", type=int, default=0, help="block index the page is about (default 0)")
    add_direction_arguments(p, input_tokens=True)
    add_measured_text_arguments(p)
    p.add_argument("--n-eigenvectors", type=int, default=4, help="eigenvectors shown per output direction (default 4)")
    add_device_args(p, dtypes=EIGH_DTYPES)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bilinear_lens.models.model import BilinearTransformer
    from bilinear_lens.views.report import write_report

    try:
        require_positive(args, "n_texts", "n_eigenvectors", "max_tokens")
        if Path(args.out).is_dir():
            raise UsageError(f"--out {args.out} is a directory; give the HTML file to write")
        try:
            model = place_model(BilinearTransformer.from_pretrained(args.checkpoint), args)
        except (FileNotFoundError, CheckpointError, ValueError) as err:
            raise UsageError(f"cannot load checkpoint {args.checkpoint}: {err}") from None
        specs = [spec for _, spec in resolve_direction_arguments(args, model, several=True, required=False)]
        measured = measured_rows(args, model, progress=False)  # the rows ablate measures on, same flags
        texts = measured.documents[:SHOWN_TEXTS]
        tokens = [s for s in specs if isinstance(s, int)]
        out = write_report(
            model,
            args.out,
            layer=args.layer,
            tokens=tokens or None,
            texts=texts,
            rows=measured.rows.to(model.W_U.device),
            documents=measured.document_ids,
            text_label=measured.describe() + (f"; the first {len(texts)} shown as text" if len(texts) < measured.n_documents else ""),
            logit_diff=next((s for s in specs if isinstance(s, tuple)), None),
            input_tokens=resolve_input_token_arguments(args, model),
            n_eigenvectors=args.n_eigenvectors,
            features=[s for s in specs if not isinstance(s, (int, tuple))],
            title=f"bilinear-lens report: {args.checkpoint}, layer {args.layer}",
            progress=not args.quiet,
        )
    except (UsageError, FileNotFoundError, CheckpointError, ValueError, TypeError) as err:
        return report_error("report", err)
    except OSError as err:  # e.g. --out not writable: the inputs were fine, writing failed
        return report_error("report", err, EXIT_FAILURE)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); measured on {measured.describe()}")
    return 0
