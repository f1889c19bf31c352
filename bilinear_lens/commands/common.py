"""Pieces shared by the subcommands: the usage-error type and checkpoint loading."""

from __future__ import annotations

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
