"""Pieces shared by the subcommands: the usage-error type, checkpoint and text-file loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bilinear_lens.models.checkpoint import CheckpointError


class UsageError(Exception):
    """A problem with the arguments or inputs, reported as ``error: ...`` with exit code 2."""


def load_model_with_tokenizer(path: str, command: str) -> Any:
    """Load a checkpoint for ``command``; a missing/corrupt checkpoint or a missing
    tokenizer (needed to read text) is a :class:`UsageError`."""
    from bilinear_lens.models.model import BilinearTransformer

    try:
        model = BilinearTransformer.from_pretrained(path)
    except (FileNotFoundError, CheckpointError, ValueError) as err:
        raise UsageError(f"cannot load checkpoint {path}: {err}") from err
    if model.tokenizer is None:
        raise UsageError(f"checkpoint {path} has no tokenizer.json; the {command} command needs one to read text")
    return model.eval()


def read_text_file(path: str) -> str:
    """The UTF-8 text of ``path``; a missing or non-UTF-8 file is a :class:`UsageError`."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"text file not found: {path}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"text file {path} is not UTF-8: {err}") from err


def read_documents(path: str, limit: int) -> list[str]:
    """The first ``limit`` documents of ``path`` (separated by blank lines, stripped, empty
    ones dropped); a file without any is a :class:`UsageError`."""
    documents = [doc.strip() for doc in read_text_file(path).split("\n\n")]
    documents = [doc for doc in documents if doc]
    if not documents:
        raise UsageError(f"text file {path} holds no text (documents are separated by blank lines)")
    return documents[:limit]
