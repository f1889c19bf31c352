"""``bilinear-lens eigen``: eigenvalues of a bilinear layer's ``Q(u)`` for an output direction
(a token, a logit difference or an SAE feature) and, per eigenvector, its most aligned input
tokens (both poles) and, with ``--input-sae``, its most aligned input SAE features.
``--json`` names the direction as plain text with its token id(s) or SAE feature index in
separate fields; eigenvector signs (which pole is "+") follow one convention for every
``--method`` and ``--dtype``: each eigenvector's largest entry is positive.

With ``--out DIR`` it writes an eigen atlas instead: the top-k of ``Q(u)`` for every
vocabulary token (``--all-tokens``) or for each given ``--token``/``--token-id``/``--sae
--feature`` direction, at every layer (or ``--layer``); resumable with ``--resume``, and
shards split across ranks under ``torchrun``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from bilinear_lens.commands.common import (
    UsageError,
    add_device_args,
    add_direction_arguments,
    analysis_parser,
    load_sae_argument,
    place_model,
    require_positive,
    resolve_device,
    resolve_direction_arguments,
)
from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.weights.eigen import METHODS, EigenConvergenceError, choose_method


def build_parser() -> argparse.ArgumentParser:
    p = analysis_parser("eigen", __doc__)
    p.add_argument("--layer", type=int, default=None, help="block index (default 0; an atlas: every layer)")
    add_direction_arguments(p, input_sae=True)
    p.add_argument("--all-tokens", action="store_true", help="atlas of every vocabulary token (needs --out)")
    p.add_argument("--top", type=int, default=None, help="eigenvectors to show (default 5) or keep in the atlas (default 8 for a new atlas; --resume keeps the atlas' own)")
    p.add_argument("--out", help="write an atlas of the given directions (or --all-tokens) to this directory")
    p.add_argument("--resume", action="store_true", help="finish an interrupted atlas in --out")
    p.add_argument("--shard-size", type=int, default=None,
                   help="directions per atlas shard (default 512 for a new atlas; --resume keeps the atlas' own)")
    p.add_argument("--n-tokens", type=int, default=8, help="input tokens per pole")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="auto: dense eigh up to d_model 2048 (all components), else lanczos (top only)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_device_args(p, dtypes=("float32", "float64"))  # torch.linalg.eigh: no half precision
    return p


def _atlas_directions(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """``model_atlas``/``build_atlas`` inputs for the atlas: all tokens, given token ids, or
    SAE feature directions (one kind per atlas, so rows have one kind of label)."""
    from bilinear_lens.weights.directions import FeatureDirection, resolve_direction

    if args.all_tokens:
        if args.token or args.token_id or args.sae or args.logit_diff or args.logit_diff_id:
            raise UsageError("--all-tokens takes no other output direction")
        return {"tokens": None}
    specs = [spec for _, spec in resolve_direction_arguments(args, model, several=True)]
    if all(isinstance(s, int) for s in specs):
        return {"tokens": specs}
    if all(isinstance(s, FeatureDirection) for s in specs):
        import torch

        return {"directions": torch.stack([resolve_direction(model, s) for s in specs]),
                "labels": [s.index for s in specs], "label_name": "feature"}
    raise UsageError("an atlas holds one kind of direction: tokens (--token/--token-id) or SAE features (--sae --feature)")


def _run_atlas(args: argparse.Namespace) -> dict:
    """Build (or resume) the atlas; returns a summary. Under torchrun, each rank does its shards."""
    from bilinear_lens.distributed import process_group
    from bilinear_lens.models.model import BilinearTransformer
    from bilinear_lens.weights.atlas import model_atlas

    if not args.out:
        raise UsageError("--all-tokens writes an atlas: give --out DIR")
    device, dtype = resolve_device(args)
    model = BilinearTransformer.from_pretrained(args.checkpoint)
    what = _atlas_directions(args, model)
    layers = list(range(model.cfg.n_layers)) if args.layer is None else [args.layer]
    options = dict(k=args.top, shard_size=args.shard_size, device=device, dtype=dtype,
                   resume=args.resume, progress=not args.quiet)
    with process_group(device) as ranks:
        atlas = model_atlas(model, args.out, layers=layers, **what, **options)
    return {"atlas": str(atlas.path), "layers": atlas.layers, "n_dirs": atlas.n_dirs, "k": atlas.k, "is_main": ranks.is_main}


def _direction_fields(model: Any, label: str, spec: Any, sae_dir: Optional[str]) -> dict[str, Any]:
    """The output direction for ``--json``: ``direction`` as plain text (a token's own text,
    not its repr), ``direction_kind``, and the ids behind it as separate fields: ``token_id``
    (a token), ``token_ids`` and ``tokens`` (a logit difference ``A - B``), or ``feature``,
    ``sae`` (``sae_dir``, the ``--sae`` directory) and ``feature_read`` (an SAE feature)."""
    from bilinear_lens.weights.directions import FeatureDirection

    def text(token: int) -> Optional[str]:
        return model.tokenizer.decode([token]) if getattr(model, "tokenizer", None) else None

    if isinstance(spec, FeatureDirection):
        return {"direction": label, "direction_kind": "feature", "feature": spec.index, "sae": sae_dir,
                "feature_read": spec.read}
    if isinstance(spec, tuple):
        a, b = spec
        return {"direction": label, "direction_kind": "logit_diff", "token_ids": [a, b], "tokens": [text(a), text(b)]}
    token = text(spec)
    return {"direction": token if token is not None else f"token id {spec}", "direction_kind": "token",
            "token_id": spec, "token": token}


def _rows(model: Any, le: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    from bilinear_lens.weights.layer_eigen import top_tokens_for_eigenvectors
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


def _print_rows(args: argparse.Namespace, label: str, rows: list[dict[str, Any]], errors: dict[int, float]) -> None:
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


# The flag of each build_atlas parameter an atlas error names (bilinear_lens.field_errors).
ATLAS_FLAGS = {"layers": "--layer", "k": "--top", "dtype": "--dtype", "shard_size": "--shard-size",
               "device": "--device", "resume": "--resume", "out": "--out"}


def _main_atlas(args: argparse.Namespace) -> int:
    from bilinear_lens.disk_errors import DiskWriteError, disk_errors_as_one_line
    from bilinear_lens.field_errors import message_for
    from bilinear_lens.locking import LockHeldError
    from bilinear_lens.weights.atlas_store import AtlasError

    try:
        require_positive(args, "top", "shard_size")
        with disk_errors_as_one_line(args.out or "", "atlas dir"):  # full / read-only disk: one line, exit 1
            summary = _run_atlas(args)
    except (UsageError, FileNotFoundError, CheckpointError, AtlasError, ValueError, TypeError, LockHeldError) as err:
        print(f"bilinear-lens eigen: error: {message_for(err, ATLAS_FLAGS)}", file=sys.stderr)
        return 2
    except DiskWriteError as err:  # valid inputs; the disk failed
        print(f"bilinear-lens eigen: error: {err}", file=sys.stderr)
        return 1
    if summary.pop("is_main"):
        print(json.dumps(summary) if args.json else
              f"atlas: {summary['atlas']} ({summary['n_dirs']} directions x layers {summary['layers']}, top {summary['k']})")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, given in (("--resume", args.resume), ("--shard-size", args.shard_size is not None)):
        if given and not args.out:  # atlas-only flags: never silently ignored
            print(f"bilinear-lens eigen: error: {flag} needs --out (it is about the atlas written there)", file=sys.stderr)
            return 2
    if args.all_tokens or args.out:
        return _main_atlas(args)
    args.layer = 0 if args.layer is None else args.layer
    args.top = 5 if args.top is None else args.top
    from bilinear_lens.weights.layer_eigen import layer_eigendecomposition
    from bilinear_lens.models.model import BilinearTransformer
    from bilinear_lens.weights.eigen import low_rank_error

    try:
        require_positive(args, "top", "n_tokens", "n_input_features")
        try:
            model = place_model(BilinearTransformer.from_pretrained(args.checkpoint), args)
        except (FileNotFoundError, CheckpointError, ValueError) as err:
            raise UsageError(f"cannot load checkpoint {args.checkpoint}: {err}") from None
        if args.top > model.cfg.d_model:  # Q(u) has d_model eigenvectors, whatever --method
            raise UsageError(f"--top must be in [1, {model.cfg.d_model}] (d_model: the eigenvectors Q(u) has), got {args.top}")
        ((label, direction),) = resolve_direction_arguments(args, model)
        fields = _direction_fields(model, label, direction, args.sae)
        method = choose_method(model.cfg.d_model) if args.method == "auto" else args.method
        full = layer_eigendecomposition(model, args.layer, direction, method="dense") if method == "dense" else None
        le = full if full is not None else layer_eigendecomposition(model, args.layer, direction, k=args.top, method=method)
        rows = _rows(model, le, args)
    except (UsageError, ValueError, TypeError) as err:
        print(f"bilinear-lens eigen: error: {err}", file=sys.stderr)
        return 2
    except EigenConvergenceError as err:  # the solver failed on valid input: not a usage error
        print(f"bilinear-lens eigen: error: {err}", file=sys.stderr)
        return 1

    errors = {k: float(low_rank_error(full.eig, k)) for k in (1, 2, 4, 8) if k <= full.eig.k} if full is not None else {}
    if args.json:
        print(json.dumps({"layer": args.layer, **fields, "eigenvectors": rows,
                          "low_rank_frobenius_error": errors}, indent=2))
    else:
        _print_rows(args, label, rows, errors)
    return 0
