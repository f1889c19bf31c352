"""Model directories: their files, and the load-time checks of what they hold.

A model directory is written through :func:`~bilinear_lens.files.atomic.atomic_directory`
(``replaces=MODEL_DIR_FILES``: only a previous model directory is replaced; see
:mod:`bilinear_lens.files.atomic` for the refusal). Loading reads only ``safetensors`` and
JSON: it never unpickles, so a checkpoint cannot run code. Every load error names the file
and what is wrong with it.

Model directory layout (``save_model`` / ``load_model``; names in :mod:`bilinear_lens.files.names`)::

    config.json          ModelConfig fields + {"format": "bilinear-lens", "format_version": 1}
    model.safetensors    state dict (non-persistent buffers such as rotary tables excluded);
                         its metadata records the config the weights were saved with
    tokenizer.json       optional: a HF ``tokenizers`` tokenizer
    tokenizer_config.json  only for a tokenizer other than ours: its BOS/EOS/pad tokens
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from bilinear_lens.data.tokenizer import save_model_tokenizer
from bilinear_lens.files.atomic import PathLike
from bilinear_lens.files.names import CONFIG_FILE, WEIGHTS_FILE
from bilinear_lens.files.serialized import CheckpointError, read_json, write_json, write_tensors

FORMAT_NAME = "bilinear-lens"
FORMAT_VERSION = 1


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


def write_model_dir(
    directory: Path, config: Mapping[str, Any], state_dict: Mapping[str, Tensor], tokenizer: Any = None
) -> None:
    """Write a model directory's files (``config.json``, ``model.safetensors``, optional
    ``tokenizer.json``) into an existing ``directory`` (callers wrap it in
    :func:`atomic_directory`). ``tokenizer``: a HF fast tokenizer or a ``tokenizers.Tokenizer``.
    The weights' safetensors metadata records ``config`` (see :func:`check_saved_config`)."""
    write_json(directory / CONFIG_FILE, {**config, "format": FORMAT_NAME, "format_version": FORMAT_VERSION})
    from bilinear_lens.tensor_checksum import checksum_metadata  # verified by load_model

    write_tensors(directory / WEIGHTS_FILE, state_dict,
                  metadata={"format": FORMAT_NAME, **saved_config_metadata(config), **checksum_metadata(state_dict)})
    if tokenizer is not None:
        save_model_tokenizer(tokenizer, directory)


def read_format_config(
    path: PathLike, format_name: str, format_version: int, what: str, kind: str
) -> dict[str, Any]:
    """The ``config.json`` fields of a directory written in ``format_name`` (``format`` and
    ``format_version`` checked and removed): a model directory (:func:`read_model_config`)
    or an image classifier's. ``what`` names the file in errors (``"model config"``), ``kind``
    what it must be (``"a bilinear-lens config"``)."""
    config_path = Path(path) / CONFIG_FILE
    data = read_json(config_path, what=what)
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {config_path} must be a JSON object")
    fmt, version = data.pop("format", None), data.pop("format_version", None)
    if fmt != format_name:
        raise CheckpointError(f"{config_path} is not {kind} (format={fmt!r}, expected {format_name!r})")
    if version != format_version:
        raise CheckpointError(f"{config_path} has format_version={version!r}; this version reads {format_version}")
    return data


def read_model_config(path: PathLike) -> dict[str, Any]:
    """The ``config.json`` fields of a model directory (format keys checked and removed)."""
    return read_format_config(path, FORMAT_NAME, FORMAT_VERSION, what="model config", kind="a bilinear-lens config")


# ---- load-time checks: non-finite weights, a config edited after saving ----

SAVED_CONFIG_KEY = "bilinear_lens_config"
# Fields that do not change what loaded weights compute (they only seed a fresh init).
INIT_ONLY_FIELDS = ("seed", "init_range")


def saved_config_metadata(config: Mapping[str, Any]) -> dict[str, str]:
    """Safetensors metadata recording ``config`` as canonical JSON (sorted keys)."""
    return {SAVED_CONFIG_KEY: json.dumps(dict(config), sort_keys=True)}


def check_saved_config(config: Mapping[str, Any], metadata: Mapping[str, str], where: str) -> None:
    """Refuse a ``config`` that differs from the one recorded in the weights' ``metadata``
    (fields other than :data:`INIT_ONLY_FIELDS`), naming every differing field with both
    values. Weights saved before the record existed (no key) pass."""
    if SAVED_CONFIG_KEY not in metadata:
        return
    try:
        saved = json.loads(metadata[SAVED_CONFIG_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{where}: metadata {SAVED_CONFIG_KEY!r} is not valid JSON: {err}") from err
    keys = sorted((set(saved) | set(config)) - set(INIT_ONLY_FIELDS))
    differing = [f"{k}: config {config.get(k)!r}, weights saved with {saved.get(k)!r}" for k in keys if config.get(k) != saved.get(k)]
    if differing:
        raise CheckpointError(f"{where}: the config differs from the one the weights were saved with ({'; '.join(differing)})")


def check_finite(state: Mapping[str, Tensor], where: str) -> None:
    """Refuse weights holding NaN or inf, naming the first such tensor and the counts."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            n_nan, n_inf = int(tensor.isnan().sum()), int(tensor.isinf().sum())
            raise CheckpointError(f"{where}: tensor {name} holds non-finite values ({n_nan} NaN, {n_inf} inf)")

