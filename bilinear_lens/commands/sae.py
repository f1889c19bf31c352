"""``bilinear-lens sae``: sparse autoencoders on a checkpoint's activations.

    bilinear-lens sae train --checkpoint runs/tiny/final --hook blocks.0.hook_resid_mid --out saes/l0in
    bilinear-lens sae train --checkpoint runs/tiny/final --config training/configs/sae-tiny.toml \\
        --set sae.k=16 --out saes/l0in
    bilinear-lens sae train --checkpoint runs/tiny/final --out saes/l0in --resume

The help texts below are plain text (argparse prints them verbatim): :data:`DESCRIPTION`
for ``sae``, :data:`TRAIN_DESCRIPTION` for ``sae train``. Exit status: 0 (trained, stopped
at ``--stop-at``, or resumed a run that was already finished), 2 (a usage, recipe, data or
run-directory error), 1 (the loss diverged); errors are printed as one line.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

DESCRIPTION = """\
Sparse autoencoders (SAELens format) on a checkpoint's activations.

  bilinear-lens sae train --checkpoint runs/tiny/final --hook blocks.0.hook_resid_mid \\
      --config training/configs/sae-tiny.toml --out saes/l0in

The result, OUT/final, is an SAELens-format SAE; --sae OUT in eigen, ablate and report
reads it. Run "bilinear-lens sae train --help" for the training options."""

TRAIN_DESCRIPTION = """\
Train a top-k SAE on one hook of a checkpoint, into the run directory --out.

  bilinear-lens sae train --checkpoint runs/tiny/final --hook blocks.0.hook_resid_mid \\
      --config training/configs/sae-tiny.toml --out saes/l0in
  bilinear-lens sae train --out saes/l0in --resume
  bilinear-lens sae train --out saes/l0in --resume --set train.steps=800

A new run without --config uses the paper's settings (top-k k=30, 4x expansion, lr 1e-4
cosine to 2e-5); --hook overrides sae.hook. The SAE trains on the model's own training data
as its checkpoint records it (run_config.toml's [data]: the same documents and val split)
unless the recipe's [data] names a source (--set data.source=PATH); a checkpoint with no
record falls back to the synthetic stories. One "SAE text: ..." line on stderr says which. --resume without --config continues with the
recipe saved in OUT/sae_recipe.json (plus any --set); a recipe given on resume may differ
from the saved one only in [train] values (e.g. more steps) and data.cache_dir; without
--checkpoint it continues on the model saved there. Resuming a finished run trains and
writes nothing."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilinear-lens sae", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train a top-k SAE on one hook of a checkpoint",
                           description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--checkpoint", type=Path, default=None,
                       help="model directory (with tokenizer.json); required for a new run (default with --resume: "
                       "the model saved in OUT/sae_recipe.json)")
    train.add_argument("--out", type=Path, required=True, help="run directory (final SAE in OUT/final)")
    train.add_argument("--hook", help="hook name, e.g. blocks.0.hook_resid_mid (overrides sae.hook)")
    train.add_argument("--config", type=Path, default=None,
                       help="TOML recipe with [sae], [train] and [data] tables (default: the paper's settings on the "
                       "model's own training data; with --resume: OUT/sae_recipe.json)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a recipe value (TOML literal), e.g. --set sae.k=16; repeatable")
    train.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                       help="continue from the newest checkpoint in --out, or from CHECKPOINT")
    train.add_argument("--stop-at", type=int, default=None, metavar="STEP", help="stop after STEP steps with a checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _saved_checkpoint(out: Path, resume: object) -> Path:
    """The model of the run in ``out`` (its ``sae_recipe.json``), for ``--resume`` without
    ``--checkpoint``; ``ValueError`` for a new run, or a saved model that is missing."""
    from bilinear_lens.sae.recipe import RECIPE_FILE, saved_model_checkpoint

    if resume is False:
        raise ValueError("--checkpoint is required for a new run (with --resume it defaults to the model "
                         f"saved in {out / RECIPE_FILE})")
    saved = saved_model_checkpoint(out)  # FileNotFoundError where the run saved no recipe
    if saved is None:
        raise ValueError(f"{out / RECIPE_FILE} names no model checkpoint; pass --checkpoint")
    if not Path(saved).is_dir():
        raise FileNotFoundError(f"the model checkpoint {saved} saved in {out / RECIPE_FILE} no longer exists; "
                                "pass --checkpoint")
    return Path(saved)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the "SAE text: ..." line, as train logs
    from bilinear_lens.commands.run_command import run_training, status_line
    from bilinear_lens.sae.recipe import load_sae_recipe, load_saved_recipe
    from bilinear_lens.sae.train import train_sae

    overrides = list(args.overrides) + ([f"sae.hook={args.hook}"] if args.hook else [])

    def run():
        checkpoint = args.checkpoint if args.checkpoint is not None else _saved_checkpoint(args.out, args.resume)
        if args.config is None and args.resume is not False:
            recipe = load_saved_recipe(args.out, overrides)  # train_sae checks it against the file again, locked
        else:
            recipe = load_sae_recipe(args.config, overrides)
        return train_sae(checkpoint, args.out, recipe, resume=args.resume, progress=not args.no_progress,
                         stop_at=args.stop_at)

    def report(result):
        yield status_line("final SAE", result.final, result.steps, result.final.name == "final",
                          result.already_finished)
        val = result.val_metrics
        if val:
            yield (f"held-out explained variance {val['val_explained_variance']:.3f}, L0 {val['val_l0']:.1f}, "
                   f"MSE {val['val_mse']:.3g} (step {result.steps})")

    return run_training("sae", args.out, args.stop_at, run, report)
