"""``bilinear-lens eigen``: eigenvalues of a bilinear layer's ``Q(u)`` for a token and,
per eigenvector, its most aligned input tokens (both poles); with ``--all-tokens`` or
``--tokens`` an eigen atlas (top-k of every token's ``Q(u)`` at every layer) written to
``--out`` (resumable with ``--resume``; shards split across ranks under ``torchrun``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from bilinear_lens.commands.common import UsageError, add_device_args, place_model, resolve_device
from bilinear_lens.models.checkpoint import CheckpointError
from bilinear_lens.weights.eigen import METHODS, EigenConvergenceError, choose_method


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bilinear-lens eigen", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="model directory (save_pretrained format)")
    p.add_argument("--layer", type=int, default=None, help="block index (default 0; an atlas: every layer)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--token", help='output token, e.g. " happy" (one token; mind the space) or an id')
    target.add_argument("--logit-diff", nargs=2, metavar=("A", "B"), help="direction logit[A] - logit[B]")
    target.add_argument("--all-tokens", action="store_true", help="atlas of every vocabulary token (needs --out)")
    target.add_argument("--tokens", nargs="+", help="atlas of these tokens (strings or ids; needs --out)")
    p.add_argument("--top", type=int, default=None, help="eigenvectors to show (default 5) or keep in the atlas (default 8)")
    p.add_argument("--out", help="atlas directory to write (with --all-tokens/--tokens)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted atlas in --out")
    p.add_argument("--shard-size", type=int, default=512, help="directions per atlas shard (default 512)")
    p.add_argument("--n-tokens", type=int, default=8, help="input tokens per pole")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="auto: dense eigh up to d_model 2048 (all components), else lanczos (top only)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_device_args(p)
    return p


def _token(spec: str):
    return int(spec) if spec.lstrip("-").isdigit() else spec


def _run_atlas(args: argparse.Namespace) -> dict:
    """Build (or resume) the atlas; returns a summary. Under torchrun, each rank does its shards."""
    from bilinear_lens.distributed import process_group
    from bilinear_lens.models.model import BilinearTransformer
    from bilinear_lens.weights.atlas import model_atlas

    if not args.out:
        raise UsageError("--all-tokens/--tokens write an atlas: give --out DIR")
    device, dtype = resolve_device(args)
    model = BilinearTransformer.from_pretrained(args.checkpoint)
    tokens = None if args.all_tokens else [_token(t) for t in args.tokens]
    layers = None if args.layer is None else [args.layer]
    with process_group(device) as ranks:
        atlas = model_atlas(model, args.out, tokens=tokens, layers=layers, k=args.top or 8, shard_size=args.shard_size,
                            device=device, dtype=dtype, resume=args.resume, progress=not args.quiet)
    return {"atlas": str(atlas.path), "layers": atlas.layers, "n_dirs": atlas.n_dirs, "k": atlas.k, "is_main": ranks.is_main}


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.all_tokens or args.tokens:
        from bilinear_lens.weights.atlas_store import AtlasError

        try:
            summary = _run_atlas(args)
        except (UsageError, FileNotFoundError, CheckpointError, AtlasError, ValueError, TypeError) as err:
            print(f"bilinear-lens eigen: error: {err}", file=sys.stderr)
            return 2
        if summary.pop("is_main"):
            print(json.dumps(summary) if args.json else
                  f"atlas: {summary['atlas']} ({summary['n_dirs']} directions x layers {summary['layers']}, top {summary['k']})")
        return 0
    args.layer = 0 if args.layer is None else args.layer
    args.top = 5 if args.top is None else args.top
    from bilinear_lens.activations.eigen_readings import layer_eigendecomposition, top_tokens_for_eigenvectors
    from bilinear_lens.weights.eigen import low_rank_error
    from bilinear_lens.models.model import BilinearTransformer

    try:
        model = place_model(BilinearTransformer.from_pretrained(args.checkpoint), args)
        direction = (
            (_token(args.logit_diff[0]), _token(args.logit_diff[1])) if args.logit_diff else _token(args.token)
        )
        method = choose_method(model.cfg.d_model) if args.method == "auto" else args.method
        full = layer_eigendecomposition(model, args.layer, direction, method="dense") if method == "dense" else None
        le = full if full is not None else layer_eigendecomposition(model, args.layer, direction, k=args.top, method=method)
        tops = top_tokens_for_eigenvectors(model, le, n_vectors=args.top, n_tokens=args.n_tokens)
    except (UsageError, FileNotFoundError, CheckpointError, ValueError, TypeError, EigenConvergenceError) as err:
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
