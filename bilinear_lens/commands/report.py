"""``bilinear-lens report``: one self-contained HTML page for a checkpoint's layer."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from bilinear_lens.commands.common import UsageError, read_documents
from bilinear_lens.models.checkpoint import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bilinear-lens report", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="model directory (save_pretrained format)")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--token", action="append", dest="tokens", help='output token (repeatable), e.g. " happy"')
    p.add_argument("--logit-diff", nargs=2, metavar=("A", "B"), help="direction for the interaction heat map")
    p.add_argument("--input-token", action="append", dest="input_tokens", help="input token for the heat map (repeatable)")
    p.add_argument("--text-file", help="sample texts, separated by blank lines (default: synthetic stories)")
    p.add_argument("--n-texts", type=int, default=8)
    p.add_argument("--n-eigenvectors", type=int, default=4)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bilinear_lens.models.model import BilinearTransformer
    from bilinear_lens.views.report import write_report

    try:
        model = BilinearTransformer.from_pretrained(args.checkpoint)
        texts = None
        if args.text_file:
            texts = read_documents(args.text_file, args.n_texts)
        out = write_report(
            model,
            args.out,
            layer=args.layer,
            tokens=args.tokens,
            texts=texts,
            logit_diff=tuple(args.logit_diff) if args.logit_diff else None,
            input_tokens=args.input_tokens,
            n_eigenvectors=args.n_eigenvectors,
            title=f"bilinear-lens report: {args.checkpoint}, layer {args.layer}",
        )
    except (FileNotFoundError, CheckpointError, ValueError, TypeError, UsageError) as err:
        print(f"bilinear-lens report: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0
