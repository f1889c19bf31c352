"""``bilinear-lens circuit pairs``: the exact pair decomposition of a bilinear MLP's output.

For one prompt (``--text`` or ``--ids``), layer ``--layer``'s MLP output along an output
direction (``--token``, ``--token-id``, ``--logit-diff``, ``--sae --feature``) at
``--position`` (default: the last) is split into pair terms ``x_c^T Q(u) x_d`` over the
residual writers: ``--writers components`` (embedding, each head, each earlier MLP, the
biases, and LayerNorm's bias and the MLP's biases when the model has them) or ``--writers
sae`` (the features of ``--writer-sae``, an SAE on ``blocks.{layer}.hook_resid_mid`` or
``blocks.{layer}.mlp.hook_in``, its ``b_dec`` and an explicit error writer). The pair terms
sum to the observed ``u . hook_mlp_out`` (exact for the observed forward with ln2's scale
frozen; ``--dtype float64`` for agreement to ~1e-15). Each writer's share is its row sum
(half the gradient times the writer); splitting a cross term evenly is a convention, the
pair matrix is not.

Prints the largest pairs and every writer's share; ``--json`` prints everything, ``--out
pairs.html`` writes an offline heatmap (no external script or link) and ``--out pairs.json``
the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from bilinear_lens.commands.circuit_prompts import add_one_prompt_arguments
from bilinear_lens.commands.common import (
    UsageError,
    add_device_args,
    add_direction_arguments,
    analysis_parser,
    load_sae_argument,
    place_model,
    report_error,
    require_positive,
    resolve_direction_arguments,
)
from bilinear_lens.files.serialized import CheckpointError

COMMAND = "circuit pairs"
OUT_SUFFIXES = (".html", ".json")


def build_parser() -> argparse.ArgumentParser:
    p = analysis_parser(COMMAND, __doc__)
    add_one_prompt_arguments(p, "the prompt as text (tokenised as model.to_tokens does: BOS first if the tokenizer has one)")
    p.add_argument("--layer", type=int, required=True, help="block whose (bilinear) MLP is decomposed")
    p.add_argument("--position", type=int, default=-1, help="token position (negative counts from the end; default -1, the last)")
    add_direction_arguments(p)
    p.add_argument("--writers", choices=("components", "sae"), default="components",
                   help="components: embedding, heads, earlier MLPs, biases; sae: the features of --writer-sae")
    p.add_argument("--writer-sae", metavar="DIR", help="SAE (SAELens format) on blocks.{layer}.hook_resid_mid or "
                   "blocks.{layer}.mlp.hook_in whose features are the writers (with --writers sae)")
    p.add_argument("--top", type=int, default=10, help="pairs to print (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--out", help="write pairs.html (heatmap, offline) or pairs.json")
    add_device_args(p, dtypes=("float32", "float64"))
    return p


def _load_model(path: str, args: argparse.Namespace) -> Any:
    from bilinear_lens.models.model import BilinearTransformer

    try:
        model = BilinearTransformer.from_pretrained(path)
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        raise UsageError(f"cannot load checkpoint {path}: {err}") from None
    if args.text is not None and model.tokenizer is None:
        raise UsageError(f"checkpoint {path} has no tokenizer.json: --text needs one (or give --ids)")
    return place_model(model, args).eval()


def _prompt(model: Any, args: argparse.Namespace) -> Any:
    import torch

    if args.text is not None:
        if not args.text:
            raise UsageError("--text is empty")
        return model.to_tokens(args.text)
    bad = [i for i in args.ids if not 0 <= i < model.cfg.d_vocab]
    if bad:
        raise UsageError(f"--ids {bad[0]} is out of range [0, {model.cfg.d_vocab}) (d_vocab)")
    if len(args.ids) > model.cfg.n_ctx:
        raise UsageError(f"--ids holds {len(args.ids)} tokens, more than the model's n_ctx={model.cfg.n_ctx}")
    return torch.tensor([args.ids], dtype=torch.long, device=model.W_E.device)


def _check_layer(model: Any, layer: int) -> None:
    from bilinear_lens.weights.layer_eigen import bilinear_layer

    try:
        bilinear_layer(model, layer)
    except ValueError as err:
        raise UsageError(f"--layer {layer}: {err}") from None


def _writers(model: Any, args: argparse.Namespace) -> Any:
    if args.writers == "components":
        if args.writer_sae:
            raise UsageError("--writer-sae goes with --writers sae")
        return "components"
    if not args.writer_sae:
        raise UsageError("--writers sae needs --writer-sae DIR (an SAE on the MLP's input)")
    sae = load_sae_argument(args.writer_sae, model, flag="--writer-sae")
    from bilinear_lens.circuits.pairs import check_sae_input_layer

    try:
        check_sae_input_layer(model, sae, args.layer)
    except ValueError as err:
        raise UsageError(f"--writer-sae {args.writer_sae}: {err}") from None
    return sae.to(dtype=model.W_E.dtype, device=model.W_E.device)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory (a crash
    leaves the old file or none, never half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _html_document(body: str, title: str) -> str:
    import html

    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body>{body}</body></html>\n")


def _print(pairs: Any, top: int) -> None:
    token = f" ({pairs.token_strs[pairs.position]!r})" if pairs.token_strs else ""
    print(f"layer {pairs.layer} MLP along {pairs.direction_label} at position {pairs.position}{token}")
    scale = f"ln2 scale frozen at {pairs.scale:.6g}" if pairs.scale is not None else "no norm scale"
    print(f"sum of pair terms {pairs.total:+.6g} = observed u . hook_mlp_out {pairs.observed:+.6g} "
          f"(difference {pairs.total - pairs.observed:+.1e}); {scale}")
    print(f"\ntop {top} pairs (c, d: x_c^T Q x_d, both orders):")
    for a, b, v in pairs.top_pairs(top):
        print(f"  {v:+.6g}  {a} x {b}")
    print("\nshares (row sums = half-gradient x writer):")
    for label, share in zip(pairs.labels, pairs.shares.tolist()):
        print(f"  {share:+.6g}  {label}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bilinear_lens.circuits.pairs import mlp_pair_decomposition
    from bilinear_lens.circuits.writers import resolve_positions

    try:
        require_positive(args, "top")
        out = Path(args.out) if args.out else None
        if out is not None and out.suffix not in OUT_SUFFIXES:
            raise UsageError(f"--out {args.out}: the file must end in .html or .json")
        model = _load_model(args.checkpoint, args)
        tokens = _prompt(model, args)
        try:
            resolve_positions(args.position, tokens.shape[1], "--position")
        except ValueError as err:
            raise UsageError(str(err)) from None
        _check_layer(model, args.layer)
        ((label, direction),) = resolve_direction_arguments(args, model)
        writers = _writers(model, args)
        pairs = mlp_pair_decomposition(model, tokens, args.layer, direction, position=args.position, writers=writers)
    except (UsageError, ValueError, TypeError) as err:
        return report_error(COMMAND, err)
    pairs.direction_label = label
    record = {**pairs.to_dict(), "tokens": tokens[0].tolist(), "writers": args.writers}
    if out is not None:
        text = (_html_document(pairs._repr_html_(), f"pairs: layer {pairs.layer}") if out.suffix == ".html"
                else json.dumps(record, indent=2) + "\n")
        _write_atomic(out, text)
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        _print(pairs, args.top)
        if out is not None:
            print(f"\nwrote {out}")
    return 0
