"""A full, too-small or read-only disk as one line naming the path and the cause.

Writers fail there in two ways: ``OSError`` with ``errno`` ENOSPC / EDQUOT / EFBIG / EROFS
(``open``, ``write``, ``mkdir``, ``rename``), and safetensors' ``SafetensorError``, whose
text carries the OS error as ``... (os error 28)`` or ``Os { code: 28, ... }``.
:func:`disk_write_error` recognises both and returns a :class:`DiskWriteError`; the
commands print it as ``error: ...`` and exit 1 (the inputs were fine, the disk was not).
Nothing is lost: every writer of this package writes into a temporary and renames it into
place, and removes the temporary when the write fails, so what was there stays intact.
"""

from __future__ import annotations

import contextlib
import errno
import re
from pathlib import Path
from typing import Iterator, Optional, Union

__all__ = ["DISK_ERRNOS", "DiskWriteError", "disk_write_error", "disk_errors_as_one_line"]

# errno -> the cause as the message says it.
DISK_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EROFS: "read-only file system",
}
_OS_ERROR_CODE = re.compile(r"os error (\d+)|Os \{ code: (\d+)")


class DiskWriteError(RuntimeError):
    """Writing to ``path`` failed because the disk is full, too small or read-only."""

    def __init__(self, message: str, path: Path, code: int):
        super().__init__(message)
        self.path, self.errno = path, code


def _error_code(err: BaseException) -> Optional[int]:
    """The OS error number behind ``err``: its ``errno``, or the ``os error N`` in its text
    (safetensors' Rust IO errors)."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    match = _OS_ERROR_CODE.search(str(err))
    return int(match.group(1) or match.group(2)) if match else None


def disk_write_error(err: BaseException, path: Union[str, Path], what: str = "output") -> Optional[DiskWriteError]:
    """``err`` as a one-line :class:`DiskWriteError` about writing ``what`` ``path`` (the
    file ``err`` names, if it names one, is added), or ``None`` if ``err`` is not a disk
    error (any other error stays what it is)."""
    code = _error_code(err)
    if code not in DISK_ERRNOS:
        return None
    path = Path(path)
    file = getattr(err, "filename", None)
    at = f" (at {file})" if file and Path(str(file)) != path else ""
    name = errno.errorcode.get(code, str(code))
    return DiskWriteError(
        f"cannot write {what} {path}{at}: {DISK_ERRNOS[code]} ({name}, errno {code}); the unfinished write was "
        "removed and what was there before is intact; free space (or make it writable) and run again",
        path, code,
    )


@contextlib.contextmanager
def disk_errors_as_one_line(path: Union[str, Path], what: str = "output") -> Iterator[None]:
    """Re-raise a disk error inside the block as :func:`disk_write_error`'s one line
    (``from None``: the traceback of the failed write says nothing more); others pass."""
    try:
        yield
    except Exception as err:
        converted = disk_write_error(err, path, what)
        if converted is None:
            raise
        raise converted from None
