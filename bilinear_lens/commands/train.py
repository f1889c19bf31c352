"""``bilinear-lens train``: train a model from a TOML recipe.

    bilinear-lens train --config training/configs/tiny.toml --out runs/tiny
    bilinear-lens train --config training/configs/tiny.toml --set train.lr=3e-4 --set model.mlp_kind=relu --out runs/relu
    bilinear-lens train --out runs/tiny --resume            # recipe: runs/tiny/run_config.toml
    torchrun --nproc_per_node=2 -m bilinear_lens.cli train --config ... --out ...

A resolved recipe (``OUT/run_config.toml``, which ``--resume`` reads by default: the recipe
of the run's newest checkpoint, rewritten only once a checkpoint made with a new recipe
exists, so a resume with ``--set`` values that fails leaves it as it was) keeps the
provenance it records: the run's ``run_config.toml`` files name the original recipe (plus
any ``--set``), not the resolved copy (:func:`recipe_origin`).

Resuming a finished run (newest checkpoint at ``train.steps``, ``final/`` holding it) trains,
evaluates and writes nothing and says "already finished at step N"; ``--set train.steps=MORE``
extends it.

Exit status: 0 (trained, stopped at ``--stop-at``, or already finished); 2 for a usage, recipe, data or
run-directory error (a bad ``--set``, a missing corpus, ``--out`` already holding checkpoints,
in use by another run or a regular file, a corrupt checkpoint), before any training step; 1 when training itself fails (the loss
diverges, or writing fails).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from bilinear_lens.commands.common import EXIT_FAILURE, EXIT_USAGE, report_error

if TYPE_CHECKING:
    from bilinear_lens.training.config import RunConfig

# The first line RunConfig.to_toml writes (bilinear_lens.training.config).
_RESOLVED_HEADER = re.compile(r"# resolved run config \(from (.+)\)")


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


def recipe_origin(path: Path) -> Optional[str]:
    """The recipe a resolved run config was written from: ``X`` of its first line
    ``# resolved run config (from X)``; ``None`` for a recipe without that line (or unreadable)."""
    try:
        with open(path, encoding="utf-8") as file:
            first = file.readline().strip()
    except (OSError, UnicodeDecodeError):
        return None
    match = _RESOLVED_HEADER.fullmatch(first)
    return match.group(1) if match else None


def load_recipe(config: Path, overrides: list[str]) -> "RunConfig":
    """:func:`~bilinear_lens.training.config.load_run_config`, keeping the provenance of a
    resolved recipe: its ``source`` names the original recipe (then ``with overrides [...]``
    for these ``overrides``), so a resumed run's ``run_config.toml`` header still says where
    the recipe came from. Load errors name the file actually read."""
    from bilinear_lens.training.config import load_run_config

    run_config = load_run_config(config, overrides)
    origin = recipe_origin(config)
    if origin is None or not run_config.source.startswith(str(config)):
        return run_config
    return dataclasses.replace(run_config, source=origin + run_config.source[len(str(config)):])


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bilinear_lens.locking import LockHeldError
    from bilinear_lens.distributed import read_environment
    from bilinear_lens.training.loop import RUN_CONFIG_FILE, NonFiniteLossError, train

    try:
        is_main = read_environment().is_main  # rank 0 logs and prints
    except ValueError as err:  # a malformed RANK / WORLD_SIZE / LOCAL_RANK
        return report_error("train", err, EXIT_USAGE)
    if not args.quiet and is_main:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.stop_at is not None and args.stop_at < 1:  # the library says stop_at; the CLI user typed --stop-at
        return report_error("train", f"--stop-at must be >= 1, got {args.stop_at}")
    config = args.config
    if config is None:
        if args.resume is False:
            return report_error("train", f"--config is required (unless resuming a run that has a {RUN_CONFIG_FILE})")
        config = args.out / RUN_CONFIG_FILE
    from bilinear_lens.disk_errors import DiskWriteError, disk_errors_as_one_line

    try:
        run_config = load_recipe(config, args.overrides)
        with disk_errors_as_one_line(args.out, "run directory"):  # full / read-only disk: one line, exit 1
            result = train(run_config, args.out, resume=args.resume, progress=not args.no_progress, stop_at=args.stop_at)
    except (ValueError, FileNotFoundError, FileExistsError, LockHeldError) as err:  # before any step
        return report_error("train", err, EXIT_USAGE)
    except (NonFiniteLossError, DiskWriteError, OSError) as err:  # the run itself failed
        return report_error("train", err, EXIT_FAILURE)
    if is_main:
        if result.already_finished:
            status = f"already finished at step {result.steps} (nothing trained or written); final checkpoint"
        else:
            status = "final checkpoint" if result.finished else f"stopped at step {result.steps}; checkpoint"
        print(f"{status}: {result.final_checkpoint}")
        if result.val_loss is not None:
            print(f"val loss {result.val_loss:.3f} nats vs unigram entropy {result.unigram_entropy:.3f} nats "
                  f"(step {result.steps})")
    return 0
