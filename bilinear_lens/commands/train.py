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

from bilinear_lens.commands.common import EXIT_USAGE, report_error
from bilinear_lens.commands.run_command import run_training, status_line, stop_at_error

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


def _image_recipe_wanted(config: Optional[Path], out: Path) -> bool:
    """Whether this run trains an image classifier: the recipe says so
    (:func:`~bilinear_lens.training.image_train.is_image_recipe`), or, resuming without
    ``--config``, the run saved an image recipe instead of a ``run_config.toml``."""
    from bilinear_lens.training.image_train import RECIPE_FILE as IMAGE_RECIPE_FILE, is_image_recipe

    if config is None:
        return (out / IMAGE_RECIPE_FILE).is_file()
    try:
        return is_image_recipe(config)
    except (OSError, ValueError):  # unreadable: the language-model path reports it as it always has
        return False


def _train_image(args: argparse.Namespace) -> int:
    """An image classifier (``training/configs/digits-*.toml``) through the same harness."""
    from bilinear_lens.training.image_train import load_image_recipe, load_saved_image_recipe, train_image_classifier

    def run():
        if args.config is None:
            recipe = load_saved_image_recipe(args.out, args.overrides)
        else:
            recipe = load_image_recipe(args.config, args.overrides)
        return train_image_classifier(recipe, args.out, resume=args.resume, progress=not args.no_progress,
                                      stop_at=args.stop_at)

    def report(result):
        yield status_line("final checkpoint", result.final, result.steps, result.finished, result.already_finished)
        if result.val_accuracy is not None:
            yield f"val accuracy {result.val_accuracy:.4f}, val loss {result.val_loss:.3f} nats (step {result.steps})"

    return run_training("train", args.out, args.stop_at, run, report)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from bilinear_lens.distributed import read_environment
    from bilinear_lens.training.loop import RUN_CONFIG_FILE, train

    try:
        is_main = read_environment().is_main  # rank 0 logs and prints
    except ValueError as err:  # a malformed RANK / WORLD_SIZE / LOCAL_RANK
        return report_error("train", err, EXIT_USAGE)
    if not args.quiet and is_main:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    bad_stop = stop_at_error("train", args.stop_at)
    if bad_stop is not None:
        return bad_stop
    if _image_recipe_wanted(args.config, args.out):
        return _train_image(args)
    config = args.config
    if config is None:
        if args.resume is False:
            return report_error("train", f"--config is required (unless resuming a run that has a {RUN_CONFIG_FILE})")
        config = args.out / RUN_CONFIG_FILE

    def run():
        run_config = load_recipe(config, args.overrides)
        return train(run_config, args.out, resume=args.resume, progress=not args.no_progress, stop_at=args.stop_at)

    def report(result):
        yield status_line("final checkpoint", result.final_checkpoint, result.steps, result.finished,
                          result.already_finished)
        if result.val_loss is not None:
            at = result.steps if result.val_step == result.steps else \
                f"{'?' if result.val_step is None else result.val_step}, the last evaluation before step {result.steps}"
            yield f"val loss {result.val_loss:.3f} nats vs unigram entropy {result.unigram_entropy:.3f} nats (step {at})"

    return run_training("train", args.out, args.stop_at, run, report, is_main)
