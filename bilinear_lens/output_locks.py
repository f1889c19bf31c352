"""One writer per atlas directory and per exported model directory, and recovery of the
leftovers a killed writer leaves there.

An atlas directory (``eigen --out``) is locked by ``DIR/.lock``, as a training run
directory is (:mod:`bilinear_lens.locking`). An export (``convert --out``, ``save_pretrained``)
replaces its whole directory by a rename, so its lock lives beside it: ``.NAME.lock`` in the
parent. A second writer gets :class:`~bilinear_lens.locking.LockHeldError` naming the holder;
a killed holder's lock is free again at once (``flock``).

The winner then cleans up after dead writers. In an atlas directory: the shard and index
temporaries (``.layerNN-*.tmp-PID-*``, ``.index.json.tmp-PID``) of pids no longer alive.
Beside an export: :func:`finish_interrupted_replace` completes a replace that was killed
between its two renames (``NAME -> .NAME.old-PID``, then ``.NAME.tmp-PID-* -> NAME``), so
``NAME`` is never left missing with only hidden copies.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path
from typing import Iterator, Union

from bilinear_lens.locking import exclusive_lock, pid_alive
from bilinear_lens.files.atomic import remove_stale_temporaries

__all__ = ["ATLAS_LOCK_FILE", "claim_atlas_dir", "claim_export_dir", "export_lock_path", "finish_interrupted_replace"]

ATLAS_LOCK_FILE = ".lock"


@contextlib.contextmanager
def claim_atlas_dir(path: Union[str, Path], writer: bool = True) -> Iterator[None]:
    """Hold atlas directory ``path``'s lock for the block (``writer``: the rank that writes
    it first; other ranks do nothing), creating ``path`` if missing (removed again, if still
    empty, when the block fails). After locking, dead writers' temporaries in ``path`` are
    removed."""
    path = Path(path)
    if not writer:
        yield
        return
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        with exclusive_lock(path / ATLAS_LOCK_FILE, what=f"atlas dir {path}"):
            remove_stale_temporaries(path)
            yield
    except BaseException:
        if created:  # a build refused before writing anything leaves no empty directory
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def export_lock_path(path: Union[str, Path]) -> Path:
    """``PARENT/.NAME.lock``: the lock of model directory ``PARENT/NAME`` (beside it, since
    writing the directory replaces it whole)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def claim_export_dir(path: Union[str, Path]) -> Iterator[None]:
    """Hold model directory ``path``'s lock (:func:`export_lock_path`) for the block, after
    finishing a replace a killed writer left half done (:func:`finish_interrupted_replace`)."""
    path = Path(path)
    if not path.parent.is_dir():
        yield  # nothing to lock or recover yet; atomic_directory creates (or refuses) the parent
        return
    with exclusive_lock(export_lock_path(path), what=f"model directory {path}"):
        finish_interrupted_replace(path)
        yield


def _dead_temporaries(path: Path, kind: str) -> dict[int, list[Path]]:
    """``{pid: [siblings]}`` of ``path`` named ``.NAME.<kind>-PID[-...]`` with ``PID`` dead."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{kind}-(\d+)(?:-.*)?")
    found: dict[int, list[Path]] = {}
    for child in path.parent.iterdir():
        match = pattern.fullmatch(child.name)
        if match is not None and not pid_alive(int(match.group(1))):
            found.setdefault(int(match.group(1)), []).append(child)
    return found


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def finish_interrupted_replace(path: Union[str, Path]) -> list[str]:
    """Complete or undo what killed writers of directory ``path`` left beside it; returns
    what was done (one phrase per action).

    A replace renames the old directory aside (``.NAME.old-PID``) only after the new one
    (``.NAME.tmp-PID-*``) is written and flushed, so: ``path`` missing with a dead pid's
    ``.old`` and ``.tmp`` finishes the replace (the ``.tmp`` becomes ``path``); with only the
    ``.old``, it restores the old directory. Every other dead writer's ``.old``/``.tmp`` of
    ``path`` (a write killed before its renames, a removal of ``.old`` cut short) is deleted.
    """
    path = Path(path)
    done: list[str] = []
    if not path.parent.is_dir():
        return done
    olds, tmps = _dead_temporaries(path, "old"), _dead_temporaries(path, "tmp")
    for pid, (old, *more) in sorted(olds.items()):
        if not os.path.lexists(path):
            new = next((t for t in tmps.pop(pid, []) if t.is_dir()), None)
            if new is not None:
                os.replace(new, path)
                done.append(f"finished pid {pid}'s interrupted replace of {path} (moved {new.name} into place)")
            else:
                os.replace(old, path)
                done.append(f"restored {path} from pid {pid}'s {old.name}")
        for leftover in ([old] if old.exists() else []) + more:
            _remove(leftover)
            done.append(f"removed {leftover.name}")
    for pid, entries in sorted(tmps.items()):
        for leftover in entries:
            _remove(leftover)
            done.append(f"removed {leftover.name}")
    return done
