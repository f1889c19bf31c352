"""JSON and safetensors files: written plainly, read with errors that name the file (a
missing file is ``FileNotFoundError``, a corrupt one :class:`CheckpointError`). Reading
never unpickles, so a file cannot run code. Callers write into an
:func:`~bilinear_lens.files.atomic.atomic_directory` or through
:func:`~bilinear_lens.files.atomic.atomic_write_text` for atomicity."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from bilinear_lens.files.atomic import PathLike


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what is expected."""


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


def read_tensor_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file's header (``{}`` if none)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"weights file {path} is corrupt or not a safetensors file: {err}") from err
