"""Training metrics: the ``metrics.jsonl`` log and the running mean between records.

``metrics.jsonl`` holds one JSON object per logged step (see :func:`make_record`). It is
appended line by line while training, so a kill can tear the last line: reading drops a
torn last line with a warning naming the file (any other bad line is an error). On
resume the log is cut back to the resumed checkpoint's step and rewritten atomically.

:class:`IntervalMeter` sums the loss and time of the steps since the last record; its
state is saved in every checkpoint, so the first record after a resume averages exactly
the steps the uninterrupted run's record averages.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from bilinear_lens.files.atomic import atomic_write_text

__all__ = ["IntervalMeter", "MetricsLog", "make_record", "read_metrics"]

logger = logging.getLogger(__name__)


def make_record(
    step: int, train_loss: Optional[float], val_loss: Optional[float], lr: float,
    tokens_per_s: Optional[float], tokens: int, elapsed_s: float,
) -> dict[str, Any]:
    """One metrics line: ``step`` (updates done), ``train_loss`` (mean over the steps since
    the last record), ``val_loss`` (when evaluated at this step, else null), ``lr`` (of the
    last update), ``tokens_per_s`` (training throughput over the interval, all ranks),
    ``tokens`` (seen so far), ``elapsed_s`` (wall time since the run first started)."""
    return {"step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
            "tokens_per_s": tokens_per_s, "tokens": tokens, "elapsed_s": round(elapsed_s, 3)}


def read_metrics(path: Path, up_to_step: Optional[int] = None) -> list[dict[str, Any]]:
    """The records of ``path`` (none if it does not exist), those after ``up_to_step``
    dropped. A torn last line (a kill mid-write) is dropped with a warning; a bad line
    elsewhere (not JSON, not UTF-8) raises ``ValueError`` naming the file and line."""
    if not path.is_file():
        return []
    # bytes, decoded line by line: a line that is not UTF-8 is a bad line like any other
    lines = [(n, line) for n, line in enumerate(path.read_bytes().splitlines(), 1) if line.strip()]
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"not UTF-8 text (byte {line[err.start:err.start + 1]!r} at column {err.start + 1})") from None
            record = json.loads(text)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with an integer 'step'")
        except ValueError as err:
            if i == len(lines) - 1:
                logger.warning("%s: dropped its torn last line %d (%s)", path, number, err)
                break
            raise ValueError(f"{path}: line {number} is not a metrics record: {err}") from None
        records.append(record)
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


class MetricsLog:
    """The records of one run, in memory on every rank and in ``path`` on the writer.

    ``records``: those kept from an earlier invocation (``resume_step``: cut back to that
    step; ``None``: a fresh run starts empty). The file is rewritten to exactly these,
    atomically, when ``write`` is true (rank 0)."""

    def __init__(self, path: Path, write: bool, resume_step: Optional[int] = None):
        self.path, self.write = path, write
        self.records = read_metrics(path, resume_step) if resume_step is not None else []
        if write:
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.write:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    @property
    def last_train_loss(self) -> Optional[float]:
        return self.records[-1]["train_loss"] if self.records else None


@dataclass
class IntervalMeter:
    """Loss sum, step count and seconds since the last record (checkpointed for resume)."""

    loss_sum: float = 0.0
    steps: int = 0
    seconds: float = 0.0

    def add(self, loss: float, seconds: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.seconds += seconds

    def mean_loss(self) -> Optional[float]:
        return self.loss_sum / self.steps if self.steps else None

    def items_per_s(self, items_per_step: int) -> Optional[float]:
        return self.steps * items_per_step / self.seconds if self.seconds > 0 else None

    def reset(self) -> None:
        self.loss_sum, self.steps, self.seconds = 0.0, 0, 0.0

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Optional[Mapping[str, Any]]) -> "IntervalMeter":
        """From :meth:`state`; ``None`` (a checkpoint from before the meter was saved): empty."""
        return cls(**state) if state else cls()
