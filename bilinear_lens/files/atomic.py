"""Atomic directories and files, and the leftovers of killed writers.

A directory is written into a temporary sibling directory and renamed into place, so a
crash mid-write never leaves a half-written directory where a good one was. Writing
replaces only a previous directory of the same kind, which the caller names (``replaces``:
the entries such a directory may hold): a regular file, or a directory holding anything
besides those and the files being written (such as a training or SAE run directory, a
training checkpoint's ``train_state.*`` or unrelated notes), is refused with
:class:`OverwriteRefusedError` naming the path and the foreign entries, and nothing is
touched (:func:`check_replaceable`). Temporaries carry the writer's pid, so
:func:`remove_stale_temporaries` can tell a dead writer's leftovers from work in progress.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from bilinear_lens.files.names import RUN_DIR_MARKERS
from bilinear_lens.locking import pid_alive

PathLike = Union[str, Path]


class OverwriteRefusedError(FileExistsError):
    """Writing a directory would replace a regular file, or delete entries that are not part
    of the kind of directory being written (see :func:`check_replaceable`)."""


def _entry_name(child: Path) -> str:
    return child.name + ("/" if child.is_dir() and not child.is_symlink() else "")


def check_replaceable(path: PathLike, allowed: Iterable[str] = (), what: str = "a directory") -> None:
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
            if any(name.rstrip("/") in RUN_DIR_MARKERS for name in foreign) else "")
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
def atomic_directory(path: PathLike, replaces: Iterable[str] = (), what: Optional[str] = None) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success it replaces ``path``.

    On an exception the temporary directory is removed and ``path`` is left untouched.
    Replacing an existing directory renames it aside first, so at every instant either
    the old or the new complete directory exists at ``path`` (or its ``.old`` sibling).

    Only a previous directory of the same kind is replaced: ``path`` must be missing, or a
    directory whose every entry is one the new directory holds or one of ``replaces``, which
    the caller gives for the kind it writes (e.g.
    :data:`~bilinear_lens.files.names.MODEL_DIR_FILES` for a model directory; default:
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
        allowed = set(written) | set(replaces)
        kind = what or f"the directory written ({', '.join(written)})"
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
