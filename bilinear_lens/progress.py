"""Progress reporting that is visible everywhere: a tqdm bar on a terminal, periodic whole
lines when stderr is not a terminal (logs, CI, notebooks run headless).

tqdm turns itself off (``disable=None``) or writes carriage-return redraws when its stream
is not a TTY; either way a 5-minute ablation sweep in a log shows nothing until it ends.
:func:`progress_bar` keeps the bar on terminals and otherwise writes one line such as
``ablate: 40%|... | 820/2048 [01:02<01:33, 13.1neuron/s]`` every
``BILINEAR_LENS_PROGRESS_SECONDS`` seconds (default 30), plus one at the start and one at the end.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Optional, TextIO

from tqdm.auto import tqdm

__all__ = ["progress_bar", "LineProgress", "line_interval_seconds", "PROGRESS_SECONDS_ENV"]

PROGRESS_SECONDS_ENV = "BILINEAR_LENS_PROGRESS_SECONDS"
DEFAULT_LINE_SECONDS = 30.0
# One log line: what, how far, how long so far and still to go.
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed} elapsed, {remaining} left, {rate_fmt}]"
OPEN_LINE_FORMAT = "{desc}: {n_fmt} [{elapsed} elapsed, {rate_fmt}]"  # no known total


def line_interval_seconds() -> float:
    """Seconds between progress lines off a terminal: ``$BILINEAR_LENS_PROGRESS_SECONDS``
    (a number >= 0) or 30. A value that is not such a number is a ``ValueError`` naming it."""
    raw = os.environ.get(PROGRESS_SECONDS_ENV)
    if raw is None or raw == "":
        return DEFAULT_LINE_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0.0 or value == float("inf"):
        raise ValueError(f"{PROGRESS_SECONDS_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


class _DropBareNewlines:
    """A stream wrapper that drops tqdm's lone ``"\\n"``/``""``/``"\\r"`` writes, so
    :class:`LineProgress` output is exactly its lines."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if text in ("", "\n", "\r"):
            return 0
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class LineProgress(tqdm):
    """tqdm writing whole lines (no carriage returns): at most one per ``mininterval``
    seconds, a line at the start and one at close, never the same line twice."""

    def __init__(self, *args: Any, file: Optional[TextIO] = None, **kwargs: Any) -> None:
        self._last_line = ""
        self._last_n: Optional[float] = None
        total = kwargs.get("total", len(args[0]) if args and hasattr(args[0], "__len__") else None)
        kwargs.setdefault("bar_format", LINE_FORMAT if total is not None else OPEN_LINE_FORMAT)
        super().__init__(*args, file=_DropBareNewlines(file or sys.stderr), dynamic_ncols=False, ascii=True, **kwargs)

    def display(self, msg: Optional[str] = None, pos: Optional[int] = None) -> bool:
        if msg == "":
            return True
        line = (self.__str__() if msg is None else msg).strip()
        if msg is None and self.total is not None and self.n >= self.total == self._last_n:
            return True  # the end was written: close() would repeat it with a new rate
        if line and line != self._last_line:
            self.fp.write(line + "\n")
            self.fp.flush()
            self._last_line = line
            self._last_n = self.n
        return True

    def clear(self, nolock: bool = False) -> None:  # lines are never redrawn
        pass

    def moveto(self, n: int) -> None:
        pass


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(
    iterable: Optional[Iterable[Any]] = None,
    *,
    enabled: bool = True,
    file: Optional[TextIO] = None,
    every_item: bool = False,
    **kwargs: Any,
) -> tqdm:
    """A progress bar over ``iterable`` (or ``total=`` with manual ``update``), tqdm's
    keyword arguments (``total``, ``desc``, ``unit``, ``initial``, ...) passed through.

    ``enabled=False`` gives a disabled bar (the caller's ``--quiet`` / ``progress=False``).
    On a terminal it is tqdm's bar; on any other stream (``file``, default stderr) a
    :class:`LineProgress` writing a line every :func:`line_interval_seconds`, or with
    ``every_item`` one per item (for a few slow items, e.g. a report's sections, which a
    30-second interval would skip from the first line to the last).
    """
    stream = sys.stderr if file is None else file
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if _is_terminal(stream):
        return tqdm(iterable, file=stream, dynamic_ncols=True, **kwargs)
    interval = 0.0 if every_item else line_interval_seconds()
    return LineProgress(iterable, file=stream, mininterval=interval, miniters=1, **kwargs)
