"""Exclusive file locks that name their holder, and liveness of process ids.

A lock is ``fcntl.flock`` on a lock file that also records who holds it (pid, host, start
time, as JSON). The kernel releases a ``flock`` when its holder exits, however it exits,
so a lock left behind by a ``kill -9`` is stale by construction: the next process takes it
and overwrites the record. The holder deletes the file when it releases the lock; a
process that locked a file just unlinked by its holder notices (the path no longer
names the inode it locked) and retries on the new file.

POSIX only (``fcntl``); a lock on a network file system is as good as its ``flock``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Iterator, Union

__all__ = ["LockHeldError", "exclusive_lock", "pid_alive"]


class LockHeldError(RuntimeError):
    """Another live process holds the lock; the message names it."""


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists on this host (``kill(pid, 0)`` probe)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: Path) -> str:
    """``pid P on host H since T`` from a lock file's record (fields it lacks read '?')."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('started', '?')}"


def _lock_fd(path: Path, wait: bool) -> int:
    """Open and ``flock`` ``path``; ``-1`` if another process holds it and ``wait`` is False."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return -1
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:  # the previous holder unlinked it after we opened it
            same_file = False
        if same_file:
            return fd
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Union[str, Path], what: str, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created, and removed on release) for the block.

    ``what`` names the locked thing in the error. ``wait=False``: raise
    :class:`LockHeldError` at once if a live process holds it, naming that process's pid,
    host and start time; ``wait=True``: block until it is free.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock_fd(path, wait)
    if fd < 0:
        raise LockHeldError(
            f"{what} is in use by {_holder(path)} (lock file {path}); wait for that process "
            "to finish or stop it (a killed holder's lock is released automatically)"
        )
    try:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode() + b"\n", 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still locked, so no one can be holding this inode
        os.close(fd)
