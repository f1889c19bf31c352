"""The run directory of a training run: its layout, its checkpoints, its lock.

::

    run_config.toml                 resolved recipe of the newest checkpoint (written after it)
    metrics.jsonl                   one JSON object per logged step (training.metrics)
    checkpoints/step_000100/        a training checkpoint (training.state.save_trainer_state)
    final/                          the same, for the last step
    .lock                           while a run writes here: its pid, host and start time

One process writes a run directory at a time (:func:`claim_run_dir`); it first removes
the temporaries that killed writers left behind. A run directory that is a regular file
(or lies under one) is refused with ``FileExistsError`` naming it.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Iterator, Optional, Union

from bilinear_lens.locking import exclusive_lock
from bilinear_lens.files.atomic import remove_stale_temporaries
from bilinear_lens.files.names import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    LOCK_FILE,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    TRAIN_STATE_JSON_FILE,
)

__all__ = [
    "CHECKPOINTS_DIR", "FINAL_DIR", "METRICS_FILE", "RUN_CONFIG_FILE", "LOCK_FILE",
    "checkpoint_path", "list_checkpoints", "latest_checkpoint", "prune_checkpoints",
    "resolve_resume", "claim_run_dir", "check_stop_at",
]

_STEP_PREFIX = "step_"


def check_stop_at(stop_at: Optional[int]) -> None:
    """``ValueError`` naming ``stop_at`` unless it is ``None`` or ``>= 1`` (every trainer's
    "stop after this many steps with a checkpoint", checked before its run directory is touched)."""
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"stop_at must be >= 1, got {stop_at}")


def checkpoint_path(out_dir: Path, step: int) -> Path:
    """``out_dir/checkpoints/step_{step:06d}``."""
    return out_dir / CHECKPOINTS_DIR / f"{_STEP_PREFIX}{step:06d}"


def list_checkpoints(out_dir: Union[str, Path]) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run, oldest first, as ``(step, path)``."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for child in root.iterdir():
            suffix = child.name[len(_STEP_PREFIX):]
            if child.name.startswith(_STEP_PREFIX) and suffix.isdigit() and (child / TRAIN_STATE_JSON_FILE).is_file():
                found.append((int(suffix), child))
    return sorted(found)


def latest_checkpoint(out_dir: Union[str, Path]) -> Optional[Path]:
    """The newest step checkpoint of a run, or ``None``."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` step checkpoints."""
    for _, path in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(resume: Union[bool, str, Path, None], out_dir: Path, holds: str = "checkpoints") -> Optional[Path]:
    """The checkpoint to resume from: ``False``/``None``: none (refused if ``out_dir``
    already has checkpoints), ``True``: the newest in ``out_dir``, a path: that one.
    ``holds``: what the refusal says ``out_dir`` holds (e.g. ``"an SAE run"``)."""
    if resume is False or resume is None:
        existing = latest_checkpoint(out_dir)
        if existing is not None:
            raise FileExistsError(
                f"{out_dir} already holds {holds} (latest {existing.name}); pass --resume "
                "(Python: resume=True) to continue that run, or choose another output directory"
            )
        return None
    if resume is True:
        path = latest_checkpoint(out_dir)
        if path is None:
            raise FileNotFoundError(f"resume requested but {out_dir / CHECKPOINTS_DIR} holds no complete checkpoint")
        return path
    path = Path(resume)
    if not (path / TRAIN_STATE_JSON_FILE).is_file():
        raise FileNotFoundError(f"cannot resume from {path}: no {TRAIN_STATE_JSON_FILE} there (not a training checkpoint)")
    return path


def make_run_dir(out_dir: Path) -> None:
    """Create ``out_dir`` (and its parents) if missing; a regular file in the way is a
    ``FileExistsError`` saying that the run directory (CLI: ``--out``) is a file."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), out_dir)
        where = "is a file" if blocker == out_dir else f"lies under {blocker}, which is a file"
        raise FileExistsError(f"run directory {out_dir} (--out) {where}, not a directory; "
                              "choose a directory for the run") from None


@contextlib.contextmanager
def claim_run_dir(out_dir: Path, writer: bool) -> Iterator[None]:
    """Hold ``out_dir``'s lock for the block (``writer``: rank 0; other ranks do nothing).

    A second writer gets :class:`~bilinear_lens.locking.LockHeldError` naming the holder;
    the lock of a killed run is free again. The winner then removes the ``.tmp-*`` /
    ``.old-*`` leftovers of dead processes in ``out_dir`` and its checkpoints."""
    if not writer:
        yield
        return
    created = not out_dir.exists()
    make_run_dir(out_dir)
    try:
        with exclusive_lock(out_dir / LOCK_FILE, what=f"run directory {out_dir}"):
            for directory in (out_dir, out_dir / CHECKPOINTS_DIR):
                remove_stale_temporaries(directory)
            yield
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty directory
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
