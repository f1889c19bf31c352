"""The outer harness of the training commands (``train`` for language models and image
classifiers, ``sae train``): one place for the ``--stop-at`` check, the exit codes, the
one-line disk errors, the exception types each code stands for and the status lines.

    run_training("train", out, stop_at, run, report, is_main)
        stop_at < 1                           -> "--stop-at must be >= 1, got N", exit 2
        run() raises one of USAGE_ERRORS      -> one line, exit 2 (before any training step)
        run() raises one of FAILURE_ERRORS    -> one line, exit 1 (the run itself failed)
        otherwise                             -> the lines of report(result) on rank 0, exit 0

``run`` loads the recipe and trains; it runs inside
:func:`~bilinear_lens.disk_errors.disk_errors_as_one_line` for ``out`` (a full or
read-only disk is one line naming the run directory, exit 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

from bilinear_lens.commands.common import EXIT_FAILURE, EXIT_USAGE, report_error

R = TypeVar("R")


def usage_errors() -> tuple[type[BaseException], ...]:
    """What a recipe, data, hook, lock or run-directory problem raises before any step (exit 2).
    ``FileNotFoundError``/``FileExistsError`` come before ``OSError`` in :func:`failure_errors`."""
    from bilinear_lens.files.serialized import CheckpointError
    from bilinear_lens.locking import LockHeldError
    from bilinear_lens.models.hook_names import UnknownHookError

    return (ValueError, FileNotFoundError, FileExistsError, CheckpointError, UnknownHookError, LockHeldError,
            ImportError)


def failure_errors() -> tuple[type[BaseException], ...]:
    """What a run that started and then failed raises (exit 1; its checkpoints stay)."""
    from bilinear_lens.disk_errors import DiskWriteError
    from bilinear_lens.training.guard import NonFiniteLossError

    return (NonFiniteLossError, DiskWriteError, OSError)


def status_line(noun: str, path: Path, steps: int, finished: bool, already_finished: bool) -> str:
    """``NOUN: PATH`` for a finished run (``noun`` e.g. ``"final checkpoint"``, ``"final SAE"``),
    ``stopped at step N; checkpoint: PATH`` for a ``--stop-at`` stop, and
    ``already finished at step N (nothing trained or written); NOUN: PATH`` for a resume of a
    finished run."""
    if already_finished:
        return f"already finished at step {steps} (nothing trained or written); {noun}: {path}"
    return f"{noun}: {path}" if finished else f"stopped at step {steps}; checkpoint: {path}"


def stop_at_error(command: str, stop_at: Optional[int]) -> Optional[int]:
    """Exit 2 with ``--stop-at must be >= 1, got N`` for a ``stop_at`` below 1, else ``None``
    (the library says ``stop_at``; the CLI user typed ``--stop-at``)."""
    if stop_at is not None and stop_at < 1:
        return report_error(command, f"--stop-at must be >= 1, got {stop_at}", EXIT_USAGE)
    return None


def run_training(
    command: str, out: Path, stop_at: Optional[int], run: Callable[[], R], report: Callable[[R], Iterable[str]],
    is_main: bool = True,
) -> int:
    """Run ``run()`` (recipe loading and training) for ``bilinear-lens COMMAND`` and map its
    outcome to an exit code (module docstring); print ``report(result)`` on rank 0."""
    from bilinear_lens.disk_errors import disk_errors_as_one_line

    bad_stop = stop_at_error(command, stop_at)
    if bad_stop is not None:
        return bad_stop
    try:
        with disk_errors_as_one_line(out, "run directory"):
            result = run()
    except usage_errors() as err:
        return report_error(command, err, EXIT_USAGE)
    except failure_errors() as err:
        return report_error(command, err, EXIT_FAILURE)
    if is_main:
        for line in report(result):
            print(line)
    return 0
