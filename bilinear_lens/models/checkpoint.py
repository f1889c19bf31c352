"""Atomic, pickle-free checkpoint directories: safetensors for tensors, JSON for the rest.

A checkpoint directory is written into a temporary sibling directory and renamed into
place, so a crash mid-write never leaves a half-written checkpoint where a good one was.
Writing replaces only a previous directory of the same kind: a regular file, or a directory
holding anything besides the files being written (for a model directory: besides
:data:`MODEL_DIR_FILES`), such as a training or SAE run directory, a training checkpoint's
``train_state.*`` or unrelated notes, is refused with :class:`OverwriteRefusedError` naming
the path and the foreign entries, and nothing is touched (:func:`check_replaceable`).
Loading reads only ``safetensors`` and JSON: it never unpickles, so a checkpoint cannot
run code. Every load error names the file and what is wrong with it.

Model directory layout (``save_model`` / ``load_model``)::

    config.json          ModelConfig fields + {"format": "bilinear-lens", "format_version": 1}
    model.safetensors    state dict (non-persistent buffers such as rotary tables excluded);
                         its metadata records the config the weights were saved with
    tokenizer.json       optional: a HF ``tokenizers`` tokenizer
    tokenizer_config.json  only for a tokenizer other than ours: its BOS/EOS/pad tokens
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from bilinear_lens.locking import pid_alive

FORMAT_NAME = "bilinear-lens"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

PathLike = Union[str, Path]


# Every file a model directory written by this package can hold (ours and the HF layout,
# with or without tokenizer files): an existing directory holding only these (and the files
# being written) is a previous model directory, which a new one may replace.
MODEL_DIR_FILES = frozenset({
    CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "generation_config.json",
})
# Entries that mark a training / SAE run directory (bilinear_lens.training.run_dir, sae.train).
_RUN_DIR_MARKERS = frozenset({"checkpoints", "metrics.jsonl", "run_config.toml", ".lock", "final", "sae_recipe.json"})


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what is expected."""


class OverwriteRefusedError(FileExistsError):
    """Writing a directory would replace a regular file, or delete entries that are not part
    of the kind of directory being written (see :func:`check_replaceable`)."""


def _entry_name(child: Path) -> str:
    return child.name + ("/" if child.is_dir() and not child.is_symlink() else "")


def check_replaceable(path: PathLike, allowed: Iterable[str] = MODEL_DIR_FILES, what: str = "a model directory") -> None:
    """Refuse (:class:`OverwriteRefusedError`, one line naming ``path``) to replace ``path``
    with ``what`` unless it is missing or a directory whose entries are all in ``allowed``.

    A regular file, and a directory holding anything else (another run, notes, a training
    checkpoint's ``train_state.*``) are refused; nothing is read or changed but the listing."""
    path = Path(path)
    if not os.path.lexists(path):
        blocker = _file_in_the_way(path)
        if blocker is not None:
            raise OverwriteRefusedError(f"{blocker} is a file, not a directory: cannot create {path} under it")
        return
    if not path.is_dir():
        raise OverwriteRefusedError(f"{path} is a file, not a directory: refusing to replace it with {what}")
    allowed = set(allowed)
    foreign = sorted(_entry_name(child) for child in path.iterdir() if child.name not in allowed)
    if not foreign:
        return
    shown = ", ".join(foreign[:8]) + (f", ... ({len(foreign) - 8} more)" if len(foreign) > 8 else "")
    kind = ("; it looks like a training or SAE run directory"
            if any(name.rstrip("/") in _RUN_DIR_MARKERS for name in foreign) else "")
    raise OverwriteRefusedError(
        f"{path} holds files that are not part of {what}: {shown}{kind}; refusing to replace it "
        "(write to a new or empty directory)"
    )


def _file_in_the_way(path: Path) -> Optional[Path]:
    """The first of ``path``'s ancestors that exists and is not a directory, if any."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def _make_directory(directory: Path, target: Path) -> None:
    """``mkdir -p directory`` (to write ``target`` in it); a regular file in the way is an
    :class:`OverwriteRefusedError` naming it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = _file_in_the_way(target) or directory
        raise OverwriteRefusedError(f"{blocker} is a file, not a directory: cannot create {target} under it") from None


def current_umask() -> int:
    """The process's file-mode creation mask: from ``/proc/self/status`` on Linux (no
    change to the process state), else by setting it and setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_name(path: Path, kind: str) -> str:
    """``.<name>.<kind>-<pid>``: the pid lets :func:`remove_stale_temporaries` tell a dead
    writer's leftovers from a live writer's work in progress."""
    return f".{path.name}.{kind}-{os.getpid()}"


@contextlib.contextmanager
def atomic_directory(
    path: PathLike, replaces: Optional[Iterable[str]] = None, what: Optional[str] = None
) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``.

    On an exception the temporary directory is removed and ``path`` is left untouched.
    Replacing an existing directory renames it aside first, so at every instant either
    the old or the new complete directory exists at ``path`` (or its ``.old`` sibling).

    Only a previous directory of the same kind is replaced: ``path`` must be missing, or a
    directory whose every entry is one the new directory holds or one of ``replaces``
    (default: :data:`MODEL_DIR_FILES` when the new directory holds model weights, else
    nothing more). Anything else (a regular file, notes, a run directory) raises
    :class:`OverwriteRefusedError` naming ``path`` and the foreign entries (``what`` names
    the kind written); the new directory is dropped and ``path`` is not touched. A regular
    file at ``path`` is refused before the caller writes anything.
    The published directory and its files get the modes an ordinary ``mkdir`` / ``open``
    would (``0o777 & ~umask``, ``0o666 & ~umask``), not ``mkdtemp``'s private ``0o700``
    nor the ``0o600`` that safetensors gives its files.
    """
    path = Path(path)
    _make_directory(path.parent, path)
    if os.path.lexists(path) and not path.is_dir():
        check_replaceable(path, what=what or "a directory")  # a regular file: refused before any work
    tmp = Path(tempfile.mkdtemp(prefix=_temp_name(path, "tmp") + "-", dir=path.parent))
    try:
        yield tmp
        written = sorted(child.name for child in tmp.iterdir())
        is_model = WEIGHTS_FILE in written
        allowed = set(written) | set(replaces if replaces is not None else MODEL_DIR_FILES if is_model else ())
        kind = what or ("a model directory" if is_model else f"the directory written ({', '.join(written)})")
        check_replaceable(path, allowed, what=kind)
        umask = current_umask()
        for child in tmp.rglob("*"):  # flush file contents before the rename publishes them
            if child.is_file():
                with open(child, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.chmod(child, 0o666 & ~umask)  # safetensors writes 0600
            elif child.is_dir():
                os.chmod(child, 0o777 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if path.exists():
            old = path.with_name(_temp_name(path, "old"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and a rename, so
    readers see the old file or the whole new one; the mode follows the umask."""
    path = Path(path)
    _make_directory(path.parent, path)
    tmp = path.with_name(_temp_name(path, "tmp"))
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


_TEMP_PID = re.compile(r"\.(?:tmp|old)-(\d+)(?:-[^/]*)?$")


def remove_stale_temporaries(directory: PathLike) -> list[Path]:
    """Delete the leftovers of killed writers directly in ``directory``: temporaries named
    ``*.tmp-<pid>[-...]`` / ``*.old-<pid>`` (this module's, and the token cache's
    ``.bin.tmp-<pid>``) whose ``pid`` is not a live process on this host. Returns them."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for child in directory.iterdir():
        match = _TEMP_PID.search(child.name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        removed.append(child)
    return removed


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
        # imported here: bilinear_lens.data.tokenizer imports this module
        from bilinear_lens.data.tokenizer import save_model_tokenizer

        save_model_tokenizer(tokenizer, directory)


def read_model_config(path: PathLike) -> dict[str, Any]:
    """The ``config.json`` fields of a model directory (format keys checked and removed)."""
    config_path = Path(path) / CONFIG_FILE
    data = read_json(config_path, what="model config")
    if not isinstance(data, dict):
        raise CheckpointError(f"model config {config_path} must be a JSON object")
    fmt, version = data.pop("format", None), data.pop("format_version", None)
    if fmt != FORMAT_NAME:
        raise CheckpointError(f"{config_path} is not a bilinear-lens config (format={fmt!r})")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{config_path} has format_version={version!r}; this version reads {FORMAT_VERSION}")
    return data


# ---- load-time checks: non-finite weights, a config edited after saving ----

SAVED_CONFIG_KEY = "bilinear_lens_config"
# Fields that do not change what loaded weights compute (they only seed a fresh init).
INIT_ONLY_FIELDS = ("seed", "init_range")


def saved_config_metadata(config: Mapping[str, Any]) -> dict[str, str]:
    """Safetensors metadata recording ``config`` as canonical JSON (sorted keys)."""
    return {SAVED_CONFIG_KEY: json.dumps(dict(config), sort_keys=True)}


def read_tensor_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file's header (``{}`` if none)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"weights file {path} is corrupt or not a safetensors file: {err}") from err


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

