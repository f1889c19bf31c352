"""Pickle-free training state: optimizer, schedule, data position, metrics and RNG states,
written next to the model files of a training checkpoint (see
:mod:`bilinear_lens.files.atomic` for the atomic directory, :mod:`bilinear_lens.models.checkpoint`
for the model files).

Resume has one home: :func:`save_trainer_state` writes a whole training checkpoint and
:func:`load_trainer_state`, right below it, restores what it wrote (the caller loads the
model weights with the model's own loader).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from bilinear_lens.files.atomic import PathLike, atomic_directory
from bilinear_lens.files.names import CHECKPOINT_DIR_FILES, TRAIN_STATE_JSON_FILE, TRAIN_STATE_TENSORS_FILE
from bilinear_lens.files.serialized import CheckpointError, read_json, read_tensors, write_json, write_tensors

# A training checkpoint directory holds the model files above plus
#
#     train_state.safetensors   optimizer tensors ("optimizer.state.{param_index}.{name}",
#                               e.g. AdamW's exp_avg / exp_avg_sq / step) and RNG states
#                               ("rng.torch", "rng.cuda.{device}", "rng.numpy")
#     train_state.json          step, scheduler state, data position, metrics, the
#                               optimizer's param_groups and non-tensor state, the
#                               Python/NumPy RNG scalars
#
# Both are plain data (no pickle), so a checkpoint can be inspected and can run no code.

TRAIN_STATE_FORMAT = "bilinear-lens-train-state"
TRAIN_STATE_VERSION = 1
# (file names, and CHECKPOINT_DIR_FILES: what a previous checkpoint at the same path may hold,
# in bilinear_lens.files.names)


@dataclass
class TrainState:
    """Everything besides the weights that a run needs to continue exactly.

    ``step``: optimizer steps completed. ``optimizer``: ``optimizer.state_dict()``.
    ``scheduler``: the learning-rate schedule's state (JSON-able). ``data``: the position
    in the data stream (JSON-able; for :class:`~bilinear_lens.data.corpus.TokenBlocks` the step
    determines the next batch). ``metrics``: running metrics (JSON-able). ``rng``: the
    generator states from :func:`capture_rng_state` (``None``: not saved).
    """

    step: int
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] = dataclasses.field(default_factory=dict)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    rng: Optional[dict[str, Any]] = None


def flatten_optimizer_state(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors
    (``state.{param_index}.{name}``) and a JSON-able rest (param_groups, scalar state)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def unflatten_optimizer_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer_state` (tuples such as ``betas`` come back as tuples)."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if len(parts) < 3 or parts[0] != "state" or not parts[1].isdigit():
            raise CheckpointError(f"{where}: unexpected optimizer tensor {key!r}")
        state.setdefault(int(parts[1]), {})[".".join(parts[2:])] = value
    for index, values in meta.get("scalar_state", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        for key in ("betas",):  # torch stores these as tuples
            if isinstance(group.get(key), list):
                group[key] = tuple(group[key])
        groups.append(group)
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def seed_everything(seed: int) -> None:
    """Seed the torch, NumPy and Python global generators (a resumed run then restores
    their saved states instead)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """States of the torch (CPU and every CUDA device), NumPy and Python generators."""
    import random

    import numpy as np

    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the generators to a state from :func:`capture_rng_state`."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():  # else: a different machine, skip
            torch.cuda.set_rng_state_all(cuda_states)


def write_train_state(directory: PathLike, state: TrainState) -> None:
    """Write ``state`` into an existing checkpoint ``directory`` (two files, no pickle)."""
    directory = Path(directory)
    tensors, optim_meta = flatten_optimizer_state(state.optimizer)
    tensors = {f"optimizer.{k}": v for k, v in tensors.items()}
    meta: dict[str, Any] = {
        "format": TRAIN_STATE_FORMAT,
        "format_version": TRAIN_STATE_VERSION,
        "step": state.step,
        "scheduler": state.scheduler,
        "data": state.data,
        "metrics": state.metrics,
        "optimizer": optim_meta,
        "rng": None,
    }
    if state.rng is not None:
        rng = state.rng
        tensors["rng.torch"] = rng["torch"]
        tensors["rng.numpy"] = rng["numpy"]["keys"]
        for i, cuda_state in enumerate(rng.get("cuda", [])):
            tensors[f"rng.cuda.{i}"] = cuda_state
        meta["rng"] = {
            "numpy": {k: v for k, v in rng["numpy"].items() if k != "keys"},
            "python": [rng["python"][0], list(rng["python"][1]), rng["python"][2]],
            "n_cuda": len(rng.get("cuda", [])),
        }
    write_tensors(directory / TRAIN_STATE_TENSORS_FILE, {k: v.cpu() for k, v in tensors.items()},
                  metadata={"format": TRAIN_STATE_FORMAT})
    write_json(directory / TRAIN_STATE_JSON_FILE, meta)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_finite_number(value: Any, minimum: float = float("-inf")) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= minimum)


def check_train_state_meta(meta: Mapping[str, Any], json_path: Path) -> None:
    """Refuse a ``train_state.json`` whose values a resume would use wrongly, before the
    resume changes anything (metrics.jsonl, the run config): ``CheckpointError`` naming the
    file, the field and the value. Checked: ``step`` (a non-negative integer), the
    ``scheduler`` / ``data`` / ``metrics`` tables, the metrics' ``elapsed_s``, ``tokens``
    and ``interval`` (``loss_sum``, ``steps``, ``seconds``), ``data.next_step`` (= step)."""

    def bad(field: str, value: Any, allowed: str) -> CheckpointError:
        return CheckpointError(f"training state {json_path}: {field}={value!r} is invalid: {allowed}")

    if not _is_count(meta.get("step")):
        raise bad("step", meta.get("step"), "must be a non-negative integer")
    step = meta["step"]
    for table in ("scheduler", "data", "metrics"):
        if not isinstance(meta.get(table, {}), dict):
            raise bad(table, meta.get(table), "must be a JSON object")
    data, metrics = meta.get("data", {}), meta.get("metrics", {})
    if "next_step" in data and data["next_step"] != step:
        raise bad("data.next_step", data["next_step"], f"must equal step={step}")
    if "elapsed_s" in metrics and not _is_finite_number(metrics["elapsed_s"], 0.0):
        raise bad("metrics.elapsed_s", metrics["elapsed_s"], "must be a finite number >= 0")
    if "tokens" in metrics and not _is_count(metrics["tokens"]):
        raise bad("metrics.tokens", metrics["tokens"], "must be a non-negative integer")
    interval = metrics.get("interval")
    if interval is not None:
        expected = {"loss_sum", "steps", "seconds"}
        if not isinstance(interval, dict) or set(interval) != expected:
            raise bad("metrics.interval", interval, f"must be an object with keys {sorted(expected)}")
        if not _is_count(interval["steps"]) or interval["steps"] > step:
            raise bad("metrics.interval.steps", interval["steps"], f"must be an integer in [0, step={step}]")
        for key in ("loss_sum", "seconds"):
            if not _is_finite_number(interval[key], 0.0 if key == "seconds" else float("-inf")):
                raise bad(f"metrics.interval.{key}", interval[key], "must be a finite number"
                          + (" >= 0" if key == "seconds" else ""))


def read_train_state(directory: PathLike) -> TrainState:
    """Read what :func:`write_train_state` wrote; tensors stay on the CPU (the optimizer's
    ``load_state_dict`` moves them to the parameters' device). Values a resume uses are
    checked first (:func:`check_train_state_meta`)."""
    directory = Path(directory)
    json_path = directory / TRAIN_STATE_JSON_FILE
    meta = read_json(json_path, what="training state")
    if not isinstance(meta, dict) or meta.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{json_path} is not a bilinear-lens training state")
    if meta.get("format_version") != TRAIN_STATE_VERSION:
        raise CheckpointError(
            f"{json_path} has format_version={meta.get('format_version')!r}; this version reads {TRAIN_STATE_VERSION}"
        )
    check_train_state_meta(meta, json_path)
    tensors = read_tensors(directory / TRAIN_STATE_TENSORS_FILE, what="training state tensors")
    try:
        optimizer = unflatten_optimizer_state(
            {k[len("optimizer."):]: v for k, v in tensors.items() if k.startswith("optimizer.")},
            meta["optimizer"], where=str(directory / TRAIN_STATE_TENSORS_FILE),
        )
        rng = None
        if meta.get("rng") is not None:
            r = meta["rng"]
            python = r["python"]
            rng = {
                "torch": tensors["rng.torch"],
                "numpy": {**r["numpy"], "keys": tensors["rng.numpy"]},
                "python": (python[0], tuple(python[1]), python[2]),
            }
            if r.get("n_cuda"):
                rng["cuda"] = [tensors[f"rng.cuda.{i}"] for i in range(r["n_cuda"])]
        return TrainState(step=int(meta["step"]), optimizer=optimizer, scheduler=meta.get("scheduler", {}),
                          data=meta.get("data", {}), metrics=meta.get("metrics", {}), rng=rng)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"training state in {directory} is incomplete or malformed: {err!r}") from err


def save_trainer_state(
    path: PathLike,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    write_model_files: Callable[[Path], None],
) -> None:
    """Write a training checkpoint at ``path`` atomically: the model's files (written by
    ``write_model_files(directory)``) and ``state`` with ``optimizer``'s state and the RNG
    states captured now. A crash mid-write leaves the previous ``path`` untouched."""
    state = dataclasses.replace(state, optimizer=optimizer.state_dict(), rng=capture_rng_state())
    with atomic_directory(path, replaces=CHECKPOINT_DIR_FILES, what="a training checkpoint") as tmp:
        write_model_files(tmp)
        write_train_state(tmp, state)


def load_trainer_state(path: PathLike, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore what :func:`save_trainer_state` wrote at ``path`` into ``optimizer`` (whose
    parameters must already hold the checkpoint's weights) and the RNGs; returns the
    state for the rest (step, metrics, data position)."""
    state = read_train_state(path)
    try:
        optimizer.load_state_dict(state.optimizer)
    except (KeyError, TypeError, ValueError) as err:  # e.g. param groups of another model
        raise CheckpointError(f"optimizer state in {Path(path) / TRAIN_STATE_JSON_FILE} does not fit the model's "
                              f"optimizer: {err}") from None
    if state.rng is not None:
        restore_rng_state(state.rng)
    return state
