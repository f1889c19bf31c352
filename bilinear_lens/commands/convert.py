"""``bilinear-lens convert``: convert a model between formats.

    bilinear-lens convert --from tdooms tdooms/ts-medium --out models/ts-medium
    bilinear-lens convert runs/tiny/final --to hf --out export/tiny       # HF Llama layout
    bilinear-lens convert some/llama-hub-id --out models/llama             # HF Llama -> ours

``--from tdooms``: the released checkpoints of Pearce et al. 2024 (both layouts, see
:mod:`bilinear_lens.models.paper_checkpoints`). ``--from auto`` (default): our checkpoint
directory, an HF Llama-format directory, or a hub id (cache-aware; ``HF_HUB_OFFLINE=1``
uses the cache only). The output is written atomically: nothing on an error.

``--out`` may be missing, empty, or a previous model directory (only model files: config,
weights, tokenizer and generation files), which is replaced. Anything else is refused
before the source is read, naming the path: a regular file, the source itself, or a
directory holding other files (a training or SAE run directory, a training checkpoint's
``train_state.*``, notes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from bilinear_lens.disk_errors import DiskWriteError, disk_errors_as_one_line
from bilinear_lens.files.atomic import check_replaceable
from bilinear_lens.files.names import MODEL_DIR_FILES
from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.locking import LockHeldError


def build_parser() -> argparse.ArgumentParser:
    from bilinear_lens.commands.common import plain_text

    p = argparse.ArgumentParser(prog="bilinear-lens convert", description=plain_text(__doc__),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="model directory or hub id (owner/name)")
    p.add_argument("--from", dest="source_format", choices=("auto", "tdooms"), default="auto",
                   help="auto: ours / HF Llama / hub id; tdooms: the paper's released checkpoints")
    p.add_argument("--to", dest="target_format", choices=("bilinear-lens", "hf"), default="bilinear-lens",
                   help="bilinear-lens (default) or hf (Llama layout for transformers / TransformerLens)")
    p.add_argument("--out", required=True,
                   help="output directory: new, empty, or a previous model directory (replaced atomically)")
    p.add_argument("--tokenizer", help="with --from tdooms: tokenizer directory or hub id (default: the one their code uses)")
    p.add_argument("--no-tokenizer", action="store_true", help="with --from tdooms: convert the weights only")
    return p


def check_output(source: str, out: str) -> None:
    """Refuse an ``--out`` that converting would destroy (module docstring), before any work."""
    if Path(source).exists() and Path(out).resolve() == Path(source).resolve():
        raise ValueError(f"--out {out} is the source model directory {source}: write the conversion to another directory")
    check_replaceable(out, MODEL_DIR_FILES, what="a model directory (--out)")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bilinear_lens.models.model import BilinearTransformer, load_paper_checkpoint

    try:
        check_output(args.source, args.out)
        if args.source_format == "tdooms":
            model = load_paper_checkpoint(args.source, tokenizer=args.tokenizer, with_tokenizer=not args.no_tokenizer)
        elif args.tokenizer or args.no_tokenizer:
            raise ValueError("--tokenizer / --no-tokenizer apply only with --from tdooms")
        else:
            model = BilinearTransformer.from_pretrained(args.source)
        with disk_errors_as_one_line(args.out, "model directory (--out)"):  # full / read-only disk: exit 1
            out = model.save_pretrained(args.out, format=args.target_format)
    except (FileNotFoundError, FileExistsError, CheckpointError, ValueError, LockHeldError) as err:
        print(f"bilinear-lens convert: error: {err}", file=sys.stderr)
        return 2
    except DiskWriteError as err:  # valid inputs; the disk failed
        print(f"bilinear-lens convert: error: {err}", file=sys.stderr)
        return 1
    cfg = model.cfg
    print(f"wrote {out} ({args.target_format}): {cfg.n_layers} layers, d_model {cfg.d_model}, "
          f"mlp {cfg.mlp_kind}, norm {cfg.normalization_type}, tokenizer {'yes' if model.tokenizer is not None else 'no'}")
    return 0
