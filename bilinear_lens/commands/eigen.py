"""``bilinear-lens eigen``: eigenvalues of a bilinear layer's ``Q(u)`` for a token and,
per eigenvector, its most aligned input tokens (both poles)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from bilinear_lens.models.checkpoint import CheckpointError
from bilinear_lens.weights.eigen import METHODS, EigenConvergenceError, choose_method


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bilinear-lens eigen", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="model directory (save_pretrained format)")
    p.add_argument("--layer", type=int, default=0)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--token", help='output token, e.g. " happy" (one token; mind the space) or an id')
    target.add_argument("--logit-diff", nargs=2, metavar=("A", "B"), help="direction logit[A] - logit[B]")
    p.add_argument("--top", type=int, default=5, help="eigenvectors to show")
    p.add_argument("--n-tokens", type=int, default=8, help="input tokens per pole")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="auto: dense eigh up to d_model 2048 (all components), else lanczos (top only)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _token(spec: str):
    return int(spec) if spec.lstrip("-").isdigit() else spec


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bilinear_lens.activations.eigen_readings import layer_eigendecomposition, top_tokens_for_eigenvectors
    from bilinear_lens.weights.eigen import low_rank_error
    from bilinear_lens.models.model import BilinearTransformer

    try:
        model = BilinearTransformer.from_pretrained(args.checkpoint)
        direction = (
            (_token(args.logit_diff[0]), _token(args.logit_diff[1])) if args.logit_diff else _token(args.token)
        )
        method = choose_method(model.cfg.d_model) if args.method == "auto" else args.method
        full = layer_eigendecomposition(model, args.layer, direction, method="dense") if method == "dense" else None
        le = full if full is not None else layer_eigendecomposition(model, args.layer, direction, k=args.top, method=method)
        tops = top_tokens_for_eigenvectors(model, le, n_vectors=args.top, n_tokens=args.n_tokens)
    except (FileNotFoundError, CheckpointError, ValueError, TypeError, EigenConvergenceError) as err:
        print(f"bilinear-lens eigen: error: {err}", file=sys.stderr)
        return 2

    label = f"logit[{args.logit_diff[0]!r}] - logit[{args.logit_diff[1]!r}]" if args.logit_diff else repr(args.token)
    rows = [
        {
            "index": t.index,
            "eigenvalue": t.eigenvalue,
            "positive_tokens": t.positive_tokens,
            "negative_tokens": t.negative_tokens,
            "positive_scores": t.positive_scores,
            "negative_scores": t.negative_scores,
        }
        for t in tops
    ]
    errors = {k: float(low_rank_error(full.eig, k)) for k in (1, 2, 4, 8) if k <= full.eig.k} if full is not None else {}
    if args.json:
        print(json.dumps({"layer": args.layer, "direction": label, "eigenvectors": rows,
                          "low_rank_frobenius_error": errors}, indent=2))
        return 0
    print(f"layer {args.layer}, output direction {label}: top {len(rows)} eigenvectors of Q(u)")
    if errors:
        print("fraction of ||Q||_F missed by rank k: " + ", ".join(f"k={k}: {e:.3f}" for k, e in errors.items()))
    for r in rows:
        print(f"\n[{r['index']}] lambda = {r['eigenvalue']:+.4f}")
        print("   + pole: " + "  ".join(repr(t) for t in r["positive_tokens"]))
        print("   - pole: " + "  ".join(repr(t) for t in r["negative_tokens"]))
    return 0
