"""Train an :class:`~bilinear_lens.models.image_classifier.ImageClassifier` with the shared
:class:`~bilinear_lens.training.loop.Trainer` (schedule, AdamW, NaN guard, metrics.jsonl,
progress, atomic checkpoints with exact resume, the run-directory lock).

Recipe (TOML, ``training/configs/digits-*.toml``), three tables::

    [model]  ImageClassifierConfig   image_shape, d_embed, d_mlp, n_layers, mlp_kind, residual, ...
    [data]   ImageDataSpec           dataset, path, test_fraction, seed, max_train, input_noise
    [train]  TrainConfig             the model trainer's section (batch_size counts images)

The task (:class:`ImageTraining`)::

    batch(step)   the step's images from a per-epoch permutation of the training set (seed
                  ``(train.seed, epoch)``), plus Gaussian pixel noise of std
                  ``data.input_noise`` (generator seeded by ``(train.seed, step)``): a pure
                  function of the step, so resume is exact. Packed as ``[batch, d_input + 1]``
                  floats, the label in the last column (integers < 2**24 are exact in float32).
    loss          cross-entropy of the logits
    evaluate()    cross-entropy on the test split; ``val_accuracy`` goes in the record

Input noise is the paper's regulariser (§3: noise makes the eigenvectors cleaner); it is
applied to training batches only. The run directory is the model trainer's layout, with
``image_recipe.json`` (the recipe of the newest checkpoint, written after it) instead of
``run_config.toml``. On resume the ``[model]`` and ``[data]`` tables must equal the saved
recipe's (``[train]`` may change, e.g. more steps); a difference is refused naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from bilinear_lens.data.images import IMAGE_DATASETS, ImageData, load_image_dataset
from bilinear_lens.files.atomic import atomic_write_text
from bilinear_lens.files.serialized import CheckpointError, read_json
from bilinear_lens.models.config import config_error, is_int, is_number
from bilinear_lens.models.image_classifier import (
    ImageClassifier,
    ImageClassifierConfig,
    load_image_classifier,
    write_image_classifier_files,
)
from bilinear_lens.training.config import TrainConfig, read_toml, toml_value
from bilinear_lens.distributed import read_environment
from bilinear_lens.training.loop import TrainTask, Trainer, apply_recipe_hyperparameters, make_optimizer
from bilinear_lens.training.metrics import read_metrics
from bilinear_lens.training.run_dir import FINAL_DIR, check_stop_at, METRICS_FILE, claim_run_dir, resolve_resume
from bilinear_lens.training.state import read_train_state

RECIPE_FILE = "image_recipe.json"
# [train] defaults for image classifiers: Adam(0.9, 0.999), no clipping, evaluate often.
IMAGE_TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 600, "batch_size": 128, "lr": 3e-3, "min_lr": 0.0, "warmup_steps": 0, "schedule": "cosine",
    "beta2": 0.999, "weight_decay": 0.1, "grad_clip": 0.0, "log_every": 50, "eval_every": 100,
    "checkpoint_every": 0, "keep_last": 2, "num_threads": 1,
}
UNSUPPORTED_TRAIN_KEYS = ("epochs", "eval_batches", "eval_batch_size")


@dataclass
class ImageDataSpec:
    """Which images to train on (:func:`~bilinear_lens.data.images.load_image_dataset`) and
    the input-noise regulariser: ``input_noise`` is the std of Gaussian noise added to every
    training pixel (0: none)."""

    dataset: str = "digits"
    path: str = ""
    test_fraction: float = 0.2
    seed: int = 0
    max_train: int = 0
    input_noise: float = 0.0

    def __post_init__(self) -> None:
        name = "ImageDataSpec"
        if self.dataset not in IMAGE_DATASETS:
            raise config_error(name, "dataset", self.dataset, f"allowed values are {sorted(IMAGE_DATASETS)}")
        if not isinstance(self.path, str):
            raise config_error(name, "path", self.path, "must be a directory path string ('' : the default source)")
        if not is_number(self.test_fraction) or not 0 < self.test_fraction < 1:
            raise config_error(name, "test_fraction", self.test_fraction, "must be a number in (0, 1)")
        for key in ("seed", "max_train"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                raise config_error(name, key, getattr(self, key), "must be a non-negative integer")
        if not is_number(self.input_noise) or not 0 <= self.input_noise < float("inf"):
            raise config_error(name, "input_noise", self.input_noise, "must be a finite number >= 0")

    def load(self) -> ImageData:
        return load_image_dataset(self.dataset, self.path or None, self.test_fraction, self.seed, self.max_train)


_SECTIONS: dict[str, type] = {"model": ImageClassifierConfig, "data": ImageDataSpec, "train": TrainConfig}


def _allowed(section: str) -> list[str]:
    keys = sorted(f.name for f in dataclasses.fields(_SECTIONS[section]))
    return [k for k in keys if section != "train" or k not in UNSUPPORTED_TRAIN_KEYS]


@dataclass
class ImageRecipe:
    model: ImageClassifierConfig = field(default_factory=ImageClassifierConfig)
    data: ImageDataSpec = field(default_factory=ImageDataSpec)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**IMAGE_TRAIN_DEFAULTS))
    source: str = "<defaults>"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"model": self.model.to_dict(), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "image recipe") -> "ImageRecipe":
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown section(s) {unknown} in {where}; allowed sections: {sorted(_SECTIONS)}")
        built: dict[str, Any] = {}
        for section, cls_ in _SECTIONS.items():
            table = data.get(section, {})
            if not isinstance(table, Mapping):
                raise ValueError(f"[{section}] in {where} must be a table, got {type(table).__name__}")
            bad = sorted(set(table) - set(_allowed(section)))
            if bad:
                raise ValueError(f"unsupported key(s) {bad} in section [{section}] of {where}; "
                                 f"allowed keys: {_allowed(section)}")
            values = {**IMAGE_TRAIN_DEFAULTS, **table} if section == "train" else dict(table)
            try:
                built[section] = cls_(**values)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        return cls(**built, source=where)

    def with_data_shape(self, data: ImageData) -> "ImageRecipe":
        """Refuse a model whose ``image_shape`` / ``n_classes`` differ from the data's."""
        for key, value in (("image_shape", tuple(data.image_shape)), ("n_classes", data.n_classes)):
            if getattr(self.model, key) != value:
                raise ValueError(f"model.{key}={getattr(self.model, key)!r} in {self.source} does not fit dataset "
                                 f"{data.name!r}, whose {key} is {value!r}")
        return self


def load_image_recipe(path: Optional[Union[str, Path]] = None, overrides: Optional[Sequence[str]] = None) -> ImageRecipe:
    """Read a TOML recipe (``None``: the defaults) with ``section.key=value`` overrides."""
    data: dict[str, Any] = read_toml(path, "image recipe") if path is not None else {}
    where = str(path) if path is not None else "<defaults>"
    return _recipe_with_overrides(data, overrides, where)


def load_saved_image_recipe(out_dir: Union[str, Path], overrides: Optional[Sequence[str]] = None) -> ImageRecipe:
    """The recipe saved in a run's ``image_recipe.json`` (for a resume without a recipe file),
    with ``section.key=value`` overrides; ``FileNotFoundError`` where the run saved none."""
    path = Path(out_dir) / RECIPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"image recipe file not found: {path}")
    saved = read_json(path, what="image recipe")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(saved).__name__}")
    train = {k: v for k, v in dict(saved.get("train", {})).items() if k not in UNSUPPORTED_TRAIN_KEYS}
    return _recipe_with_overrides({**saved, "train": train}, overrides, str(path))  # asdict wrote every field


def is_image_recipe(path: Union[str, Path]) -> bool:
    """Whether the TOML recipe ``path`` is an image classifier's: its ``[model]`` names an
    ``image_shape`` or its ``[data]`` a ``dataset`` (keys only :class:`ImageRecipe` has; a
    language model's ``[data]`` says ``source``). Read errors as :func:`read_toml`."""
    data = read_toml(path, "recipe")
    model, images = data.get("model", {}), data.get("data", {})
    return (isinstance(model, Mapping) and "image_shape" in model) or (isinstance(images, Mapping) and "dataset" in images)


def _recipe_with_overrides(data: Mapping[str, Any], overrides: Optional[Sequence[str]], where: str) -> ImageRecipe:
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for text in overrides or []:
        name, eq, raw = text.partition("=")
        section, dot, key = name.strip().partition(".")
        if not eq or not dot or section not in _SECTIONS or key not in _allowed(section):
            raise ValueError(f"override {text!r} must be section.key=value with section one of {sorted(_SECTIONS)} "
                             "and key one of that section's keys")
        data.setdefault(section, {})[key] = toml_value(raw.strip())
    return ImageRecipe.from_dict(data, where=where + (f" with overrides {list(overrides)}" if overrides else ""))


# ------------------------------------------------------------------------ the task


def step_seed(seed: int, index: int) -> int:
    """A generator seed for ``(seed, index)`` (distinct pairs give distinct seeds)."""
    return (seed * 1_000_003 + index) % (2**63 - 1)


class ImageTraining:
    """The classifier's half of a training run (module docstring)."""

    def __init__(self, model: ImageClassifier, data: ImageData, recipe: ImageRecipe, device: torch.device):
        self.model, self.data, self.recipe, self.device = model, data, recipe, device
        tc = recipe.train
        if tc.batch_size > len(data.train_x):
            raise ValueError(f"train.batch_size={tc.batch_size} in {recipe.source} exceeds the {len(data.train_x)} "
                             f"training images of {data.name!r}")
        self.batches_per_epoch = len(data.train_x) // tc.batch_size
        self.val: dict[str, float] = {}
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:  # one permutation per epoch, a function of (seed, epoch)
            gen = torch.Generator().manual_seed(step_seed(self.recipe.train.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(len(self.data.train_x), generator=gen), epoch
        return self._perm

    def batch(self, step: int) -> Tensor:
        bs = self.recipe.train.batch_size
        epoch, i = divmod(step, self.batches_per_epoch)
        idx = self._permutation(epoch)[i * bs:(i + 1) * bs]
        x = self.data.train_x[idx]
        noise = self.recipe.data.input_noise
        if noise > 0:
            gen = torch.Generator().manual_seed(step_seed(self.recipe.train.seed + 1, step))
            x = x + noise * torch.randn(x.shape, generator=gen)
        return torch.cat([x, self.data.train_y[idx, None].float()], dim=1)

    @staticmethod
    def loss(model: torch.nn.Module, packed: Tensor) -> Tensor:
        return F.cross_entropy(model(packed[:, :-1]).float(), packed[:, -1].long())

    @torch.no_grad()
    def evaluate(self) -> float:
        was_training = self.model.training
        self.model.eval()
        x, y = self.data.test_x.to(self.device), self.data.test_y.to(self.device)
        logits = torch.cat([self.model(chunk) for chunk in x.split(4096)]).float()
        self.model.train(was_training)
        self.val = {"val_accuracy": float((logits.argmax(-1) == y).float().mean())}
        return float(F.cross_entropy(logits, y))

    def record_fields(self, evaluated: bool) -> dict[str, Any]:
        return dict(self.val) if evaluated else {}

    def data_state(self, step: int) -> dict[str, Any]:
        tc = self.recipe.train
        return {"next_step": step, "epoch": step // self.batches_per_epoch, "batch_size": tc.batch_size, "seed": tc.seed}

    def task(self, out_dir: Path) -> TrainTask:
        return TrainTask(
            model=self.model, batch=self.batch, loss=self.loss, evaluate=self.evaluate,
            write_model_files=lambda directory: write_image_classifier_files(directory, self.model),
            data_state=self.data_state, tokens_per_step=self.recipe.train.batch_size,
            record_fields=self.record_fields, after_checkpoint=lambda path: _write_recipe(out_dir, self.recipe),
        )


@dataclass
class ImageTrainResult:
    """``final``: ``out/final`` (or the checkpoint where ``stop_at`` stopped); ``val_loss`` and
    ``val_accuracy`` of the last evaluation; every ``metrics.jsonl`` record."""

    final: Path
    steps: int
    val_loss: Optional[float]
    val_accuracy: Optional[float]
    metrics: list[dict[str, Any]]
    finished: bool = True
    already_finished: bool = False


def _write_recipe(out_dir: Path, recipe: ImageRecipe) -> None:
    atomic_write_text(out_dir / RECIPE_FILE, json.dumps(recipe.to_dict(), indent=2, sort_keys=True) + "\n")


def _check_resume_recipe(out_dir: Path, recipe: ImageRecipe) -> None:
    path = out_dir / RECIPE_FILE
    if not path.is_file():
        return
    saved = read_json(path, what="image recipe")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(saved).__name__}")
    given = recipe.to_dict()
    diffs = [f"{section}.{key}: saved {saved.get(section, {}).get(key)!r}, given {value!r}"
             for section in ("model", "data") for key, value in given[section].items()
             if saved.get(section, {}).get(key) != value]
    if diffs:
        raise ValueError(f"cannot resume {out_dir}: the recipe ({recipe.source}) differs from the run's ({path}) in "
                         f"{'; '.join(diffs)}; on resume only [train] values may change")


def _last_val(records: list[dict[str, Any]]) -> tuple[Optional[float], Optional[float]]:
    last = next((r for r in reversed(records) if r.get("val_accuracy") is not None), {})
    return last.get("val_loss"), last.get("val_accuracy")


def train_image_classifier(
    recipe: ImageRecipe, out_dir: Union[str, Path], resume: Union[bool, str, Path] = False, progress: bool = True,
    stop_at: Optional[int] = None, data: Optional[ImageData] = None,
) -> ImageTrainResult:
    """Train ``recipe`` into ``out_dir`` (module docstring). ``resume``: ``True`` for the
    newest checkpoint, a checkpoint path, or ``False`` (a fresh run, refused where ``out_dir``
    holds one). ``data``: the images (default: ``recipe.data.load()``; given, it must be what
    the recipe names: tests pass a cached copy). ``stop_at``: stop there with a checkpoint.
    Resuming a finished run trains and writes nothing (``already_finished``)."""
    out_dir = Path(out_dir)
    check_stop_at(stop_at)
    tc = recipe.train
    env = read_environment(tc.device)
    if env.enabled:
        raise ValueError(f"WORLD_SIZE={env.world_size}: the image trainer runs in one process (launch it without torchrun)")
    data = recipe.data.load() if data is None else data
    recipe.with_data_shape(data)
    threads_before = torch.get_num_threads()
    try:
        with claim_run_dir(out_dir, writer=True):
            ckpt = resolve_resume(resume, out_dir, holds="an image-classifier run")
            if ckpt is not None:
                _check_resume_recipe(out_dir, recipe)
                step = read_train_state(ckpt).step
                final = out_dir / FINAL_DIR
                if step == tc.steps and final.is_dir() and read_train_state(final).step == step:
                    records = read_metrics(out_dir / METRICS_FILE)
                    return ImageTrainResult(final, step, *_last_val(records), records, already_finished=True)
            if tc.num_threads:
                torch.set_num_threads(tc.num_threads)
            model = ImageClassifier(recipe.model) if ckpt is None else load_image_classifier(ckpt)
            if ckpt is not None and model.cfg != recipe.model:
                raise ValueError(f"cannot resume from {ckpt}: its model config differs from {recipe.source}")
            model = model.to(env.device).train()
            training = ImageTraining(model, data, recipe, env.device)
            trainer = Trainer(training.task(out_dir), make_optimizer(model, tc), tc, tc.steps, env, out_dir, ckpt,
                              progress)
            if ckpt is not None:
                apply_recipe_hyperparameters(trainer.optimizer, tc)
            final = trainer.fit(stop_at)
            val_loss, val_acc = _last_val(trainer.log.records)
            return ImageTrainResult(final, trainer.step, val_loss, val_acc, trainer.log.records,
                                    finished=trainer.finished)
    finally:
        torch.set_num_threads(threads_before)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m bilinear_lens.training.image_train --config R.toml --out DIR [--resume] [--set k=v]``."""
    parser = argparse.ArgumentParser(prog="python -m bilinear_lens.training.image_train",
                                     description="Train an image classifier (digits / MNIST) from a recipe.")
    parser.add_argument("--config", help="TOML recipe (training/configs/digits-*.toml); default: the defaults")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a value")
    parser.add_argument("--stop-at", type=int, default=None, help="stop after this step (with a checkpoint)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        recipe = load_image_recipe(args.config, args.set)
        result = train_image_classifier(recipe, args.out, resume=args.resume, progress=not args.no_progress,
                                        stop_at=args.stop_at)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    acc = "n/a" if result.val_accuracy is None else f"{result.val_accuracy:.4f}"
    print(f"step {result.steps}: val_accuracy {acc}; checkpoint {result.final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
