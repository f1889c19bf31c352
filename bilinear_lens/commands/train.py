"""``bilinear-lens train``: train a model from a TOML recipe.

    bilinear-lens train --config training/configs/tiny.toml --out runs/tiny
    bilinear-lens train --config training/configs/tiny.toml --set train.lr=3e-4 --set model.mlp_kind=relu --out runs/relu
    bilinear-lens train --out runs/tiny --resume            # recipe: runs/tiny/run_config.toml
    torchrun --nproc_per_node=2 -m bilinear_lens.cli train --config ... --out ...
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bilinear-lens train",
        description="Train a bilinear (or baseline) transformer from a TOML recipe with [model], [data] "
        "and [train] tables. Writes checkpoints, metrics.jsonl and final/ into --out.",
    )
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML recipe (default with --resume: OUT/run_config.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value, parsed as a TOML literal (bare words are strings); "
                        "repeatable, e.g. --set train.lr=3e-4 --set model.mlp_kind=relu")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from the newest checkpoint in --out, or from CHECKPOINT")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop after STEP steps with a checkpoint (as if preempted); finish later with --resume")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--quiet", action="store_true", help="only print the result")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bilinear_lens.locking import LockHeldError
    from bilinear_lens.training.config import load_run_config
    from bilinear_lens.training.distributed import read_environment
    from bilinear_lens.training.loop import RUN_CONFIG_FILE, NonFiniteLossError, train

    try:
        is_main = read_environment().is_main  # rank 0 logs and prints
    except ValueError as err:  # a malformed RANK / WORLD_SIZE / LOCAL_RANK
        print(f"bilinear-lens train: error: {err}", file=sys.stderr)
        return 1
    if not args.quiet and is_main:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = args.config
    if config is None:
        if args.resume is False:
            print("bilinear-lens train: --config is required (unless resuming a run that has a "
                  f"{RUN_CONFIG_FILE})", file=sys.stderr)
            return 2
        config = args.out / RUN_CONFIG_FILE
    try:
        run_config = load_run_config(config, args.overrides)
        result = train(run_config, args.out, resume=args.resume, progress=not args.no_progress, stop_at=args.stop_at)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError, LockHeldError) as err:
        print(f"bilinear-lens train: error: {err}", file=sys.stderr)
        return 1
    if is_main:
        status = "final checkpoint" if result.finished else f"stopped at step {result.steps}; checkpoint"
        print(f"{status}: {result.final_checkpoint}")
        if result.val_loss is not None:
            print(f"val loss {result.val_loss:.3f} nats vs unigram entropy {result.unigram_entropy:.3f} nats "
                  f"(step {result.steps})")
    return 0
