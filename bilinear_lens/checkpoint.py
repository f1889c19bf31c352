"""Atomic, pickle-free checkpoint directories: safetensors for tensors, JSON for the rest.

A checkpoint directory is written into a temporary sibling directory and renamed into
place, so a crash mid-write never leaves a half-written checkpoint where a good one was.
Loading reads only ``safetensors`` and JSON: it never unpickles, so a checkpoint cannot
run code. Every load error names the file and what is wrong with it.

Model directory layout (``save_model`` / ``load_model``)::

    config.json          ModelConfig fields + {"format": "bilinear-lens", "format_version": 1}
    model.safetensors    state dict (non-persistent buffers such as rotary tables excluded)
    tokenizer.json       optional: a HF ``tokenizers`` tokenizer
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT_NAME = "bilinear-lens"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

PathLike = Union[str, Path]


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what is expected."""


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``.

    On an exception the temporary directory is removed and ``path`` is left untouched.
    Replacing an existing directory renames it aside first, so at every instant either
    the old or the new complete directory exists at ``path`` (or its ``.old`` sibling).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):  # flush file contents before the rename publishes them
            if child.is_file():
                with open(child, "rb+") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: PathLike, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """Parse ``path``; a missing or malformed file raises with the path and reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{what} {path} is not valid JSON: {err}") from err


def write_tensors(path: PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Save tensors with safetensors (contiguous, detached copies; shared storage is fine)."""
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))


def read_tensors(path: PathLike, device: Union[str, torch.device] = "cpu", what: str = "weights file") -> dict[str, Tensor]:
    """Load a safetensors file (never unpickles); corrupt files raise :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{what} {path} is corrupt or not a safetensors file: {err}") from err


def check_state_dict(expected: Mapping[str, Tensor], found: Mapping[str, Tensor], where: str) -> None:
    """Raise :class:`CheckpointError` naming missing/unexpected keys and shape mismatches."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    for key in sorted(set(expected) & set(found)):
        if tuple(expected[key].shape) != tuple(found[key].shape):
            problems.append(f"{key}: shape {tuple(found[key].shape)} in file, model expects {tuple(expected[key].shape)}")
    if problems:
        raise CheckpointError(f"{where} does not match the model config: " + "; ".join(problems))


def write_model_files(model: Any, directory: Path) -> None:
    """Write config, weights and tokenizer of ``model`` into an existing ``directory``."""
    write_json(directory / CONFIG_FILE, {**model.cfg.to_dict(), "format": FORMAT_NAME, "format_version": FORMAT_VERSION})
    write_tensors(directory / WEIGHTS_FILE, model.state_dict(), metadata={"format": FORMAT_NAME})
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # HF fast tokenizer or tokenizers.Tokenizer
        backend.save(str(directory / TOKENIZER_FILE))


def save_model(model: Any, path: PathLike) -> Path:
    """Atomically write ``model`` (a :class:`BilinearTransformer`) to directory ``path``."""
    with atomic_directory(path) as tmp:
        write_model_files(model, tmp)
    return Path(path)


def load_config(path: PathLike) -> Any:
    """Read and validate ``config.json`` of a model directory."""
    from bilinear_lens.config import ModelConfig

    config_path = Path(path) / CONFIG_FILE
    data = read_json(config_path, what="model config")
    if not isinstance(data, dict):
        raise CheckpointError(f"model config {config_path} must be a JSON object")
    fmt, version = data.pop("format", None), data.pop("format_version", None)
    if fmt != FORMAT_NAME:
        raise CheckpointError(f"{config_path} is not a bilinear-lens config (format={fmt!r})")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version={version!r}; this version reads {FORMAT_VERSION}")
    return ModelConfig.from_dict(data, where=str(config_path))


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu") -> Any:
    """Load a :class:`BilinearTransformer` saved by :func:`save_model`."""
    from bilinear_lens.model import BilinearTransformer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    cfg = load_config(path)
    tokenizer = None
    if (path / TOKENIZER_FILE).is_file():
        from bilinear_lens.tokenizer import load_tokenizer, to_hf_tokenizer

        tokenizer = to_hf_tokenizer(load_tokenizer(path / TOKENIZER_FILE))
    model = BilinearTransformer(cfg, tokenizer=tokenizer)
    state = read_tensors(path / WEIGHTS_FILE, device="cpu", what="model weights")
    expected = model.state_dict()
    check_state_dict(expected, state, where=str(path / WEIGHTS_FILE))
    for key, tensor in state.items():
        if tensor.dtype != expected[key].dtype:
            raise CheckpointError(f"{path / WEIGHTS_FILE}: {key} has dtype {tensor.dtype}, config says {expected[key].dtype}")
    model.load_state_dict(state)
    return model.to(device)


# --- training state ------------------------------------------------------------------------
#
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

TRAIN_STATE_TENSORS_FILE = "train_state.safetensors"
TRAIN_STATE_JSON_FILE = "train_state.json"
TRAIN_STATE_FORMAT = "bilinear-lens-train-state"
TRAIN_STATE_VERSION = 1


@dataclass
class TrainState:
    """Everything besides the weights that a run needs to continue exactly.

    ``step``: optimizer steps completed. ``optimizer``: ``optimizer.state_dict()``.
    ``scheduler``: the learning-rate schedule's state (JSON-able). ``data``: the position
    in the data stream (JSON-able; for :class:`~bilinear_lens.data.TokenBlocks` the step
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


def read_train_state(directory: PathLike) -> TrainState:
    """Read what :func:`write_train_state` wrote; tensors stay on the CPU (the optimizer's
    ``load_state_dict`` moves them to the parameters' device)."""
    directory = Path(directory)
    json_path = directory / TRAIN_STATE_JSON_FILE
    meta = read_json(json_path, what="training state")
    if not isinstance(meta, dict) or meta.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{json_path} is not a bilinear-lens training state")
    if meta.get("format_version") != TRAIN_STATE_VERSION:
        raise CheckpointError(
            f"{json_path} has format_version={meta.get('format_version')!r}; this version reads {TRAIN_STATE_VERSION}"
        )
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
