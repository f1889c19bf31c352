"""Which local corpus file a model was trained on: its fingerprint (resolved path, size,
SHA-256, modification time), recorded beside the recipe so an analysis can tell the file
it finds from the one the model saw (issue 25 audit: a relative ``data.source`` read from
another working directory silently measured a different ``stories.jsonl``).

The fingerprint is computed once, when the token cache is built (:mod:`bilinear_lens.data.corpus`
keeps it in the cache's sidecar), and written as ``data_fingerprint.json`` into every
training checkpoint and the run directory, next to ``run_config.toml`` (plain JSON, written
atomically). :func:`find_difference` checks a file against it: the same path with the same
size and modification time is the same file (the token cache's own rule), so checking the
file a run was trained on costs no read; anything else is hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from bilinear_lens.files.atomic import atomic_write_text
from bilinear_lens.files.names import DATA_FINGERPRINT_FILE

__all__ = ["DATA_FINGERPRINT_FILE", "FileFingerprint", "fingerprint_file", "write_fingerprint", "read_fingerprint",
           "find_difference", "holds_recorded_bytes"]

FINGERPRINT_FORMAT = "bilinear-lens-data-fingerprint"
FINGERPRINT_VERSION = 1
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FileFingerprint:
    """``path``: the file's resolved absolute path; ``size``: bytes; ``sha256``: hex digest
    of its bytes; ``mtime_ns``: modification time when it was hashed."""

    path: str
    size: int
    sha256: str
    mtime_ns: int

    def describe(self) -> str:
        """``"sha256 abcd1234..., 1234 bytes"`` (``"1234 bytes"`` when not hashed): enough to
        tell two files apart in a message."""
        return f"sha256 {self.sha256[:8]}..., {self.size} bytes" if self.sha256 else f"{self.size} bytes"


def fingerprint_file(path: str | os.PathLike[str]) -> FileFingerprint:
    """Hash ``path`` (streamed in 1 MiB chunks: one pass, constant memory)."""
    path = Path(path).expanduser().resolve()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            digest.update(chunk)
    stat = path.stat()
    return FileFingerprint(str(path), stat.st_size, digest.hexdigest(), stat.st_mtime_ns)


def write_fingerprint(path: str | os.PathLike[str], fingerprint: FileFingerprint) -> None:
    """Write ``fingerprint`` as JSON to ``path`` atomically (temporary sibling + rename)."""
    record = {"format": FINGERPRINT_FORMAT, "version": FINGERPRINT_VERSION, **asdict(fingerprint)}
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_fingerprint(path: str | os.PathLike[str]) -> Optional[FileFingerprint]:
    """The fingerprint written by :func:`write_fingerprint` at ``path``, ``None`` when there is
    no file; a malformed one is a ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record: Any = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or record.get("format") != FINGERPRINT_FORMAT:
            raise ValueError(f"not a {FINGERPRINT_FORMAT} file")
        fingerprint = FileFingerprint(str(record["path"]), int(record["size"]), str(record["sha256"]),
                                      int(record["mtime_ns"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ValueError(f"data fingerprint {path} is malformed: {err}") from None
    return fingerprint


def find_difference(recorded: FileFingerprint, path: str | os.PathLike[str]) -> Optional[FileFingerprint]:
    """``None`` when ``path`` holds the bytes ``recorded`` describes, else the fingerprint of
    what is there (``sha256`` left empty when the sizes already differ: no need to read it).

    Same resolved path, size and modification time: the same file, not read (the token
    cache's rule). Otherwise the sizes are compared, then the SHA-256 of the bytes."""
    resolved = Path(path).expanduser().resolve()
    stat = resolved.stat()
    if str(resolved) == recorded.path and stat.st_size == recorded.size and stat.st_mtime_ns == recorded.mtime_ns:
        return None
    if stat.st_size != recorded.size:
        return FileFingerprint(str(resolved), stat.st_size, "", stat.st_mtime_ns)
    found = fingerprint_file(resolved)
    return None if found.sha256 == recorded.sha256 else found


def holds_recorded_bytes(recorded: Optional[FileFingerprint], path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a file holding the bytes ``recorded`` describes (:func:`find_difference`);
    ``False`` without a fingerprint or a file there. What makes a corpus at another path the
    recorded one (moved, or a copy)."""
    return recorded is not None and Path(path).expanduser().is_file() and find_difference(recorded, path) is None
