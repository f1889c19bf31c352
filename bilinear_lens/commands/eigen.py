"""``bilinear-lens eigen``: eigenvalues of a bilinear layer's ``Q(u)`` for an output direction
(a token, a logit difference or an SAE feature) and, per eigenvector, its most aligned input
tokens (both poles) and, with ``--input-sae``, its most aligned input SAE features."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from bilinear_lens.commands.common import (
    UsageError,
    add_direction_arguments,
    load_sae_argument,
    require_positive,
    resolve_direction_arguments,
)
from bilinear_lens.models.checkpoint import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bilinear-lens eigen", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="model directory (save_pretrained format)")
    p.add_argument("--layer", type=int, default=0)
    add_direction_arguments(p, input_sae=True)
    p.add_argument("--top", type=int, default=5, help="eigenvectors to show")
    p.add_argument("--n-tokens", type=int, default=8, help="input tokens per pole")
    p.add_argument("--method", choices=("dense", "lanczos", "lobpcg"), default="dense")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _rows(model: Any, le: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from bilinear_lens.activations.eigen_readings import top_tokens_for_eigenvectors
    from bilinear_lens.sae.features import eigenvector_input_features

    tops = top_tokens_for_eigenvectors(model, le, n_vectors=args.top, n_tokens=args.n_tokens)
    rows = [{"index": t.index, "eigenvalue": t.eigenvalue, "positive_tokens": t.positive_tokens,
             "negative_tokens": t.negative_tokens, "positive_scores": t.positive_scores,
             "negative_scores": t.negative_scores} for t in tops]
    if args.input_sae:
        sae_in = load_sae_argument(args.input_sae, model, flag="--input-sae")
        n = min(args.n_input_features, sae_in.cfg.d_sae)
        for row, f in zip(rows, eigenvector_input_features(model, le, sae_in, n_vectors=len(rows), n_features=n)):
            row.update(positive_features=f.positive_features, positive_feature_cosines=f.positive_cosines,
                       negative_features=f.negative_features, negative_feature_cosines=f.negative_cosines)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bilinear_lens.activations.eigen_readings import layer_eigendecomposition
    from bilinear_lens.models.model import BilinearTransformer
    from bilinear_lens.weights.eigen import low_rank_error

    try:
        require_positive(args, "top", "n_tokens", "n_input_features")
        try:
            model = BilinearTransformer.from_pretrained(args.checkpoint)
        except (FileNotFoundError, CheckpointError, ValueError) as err:
            raise UsageError(f"cannot load checkpoint {args.checkpoint}: {err}") from None
        ((label, direction),) = resolve_direction_arguments(args, model)
        full = layer_eigendecomposition(model, args.layer, direction, method="dense") if args.method == "dense" else None
        le = full if full is not None else layer_eigendecomposition(model, args.layer, direction, k=args.top, method=args.method)
        rows = _rows(model, le, args)
    except (UsageError, ValueError, TypeError) as err:
        print(f"bilinear-lens eigen: error: {err}", file=sys.stderr)
        return 2

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
        if "positive_features" in r:
            print("   + input features: " + "  ".join(f"{i} ({c:+.2f})" for i, c in zip(r["positive_features"], r["positive_feature_cosines"])))
            print("   - input features: " + "  ".join(f"{i} ({c:+.2f})" for i, c in zip(r["negative_features"], r["negative_feature_cosines"])))
    return 0
