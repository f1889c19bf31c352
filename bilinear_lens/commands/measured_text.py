"""The measured-text rule for the commands: the library's
(:mod:`bilinear_lens.training.measured_text`, also what the report and notebooks call), with
its errors as :class:`~bilinear_lens.commands.common.UsageError` (exit 2), and the flags
``ablate`` and ``report`` share so both measure on the same tokens by default."""

from __future__ import annotations

import argparse
from typing import Any, Optional

from bilinear_lens.commands.common import UsageError, add_documents_argument
from bilinear_lens.training import measured_text as library
from bilinear_lens.training.measured_text import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_N_TEXTS,
    DEFAULT_SEQ_LEN,
    MeasuredRows,
    MeasuredText,
)

__all__ = ["MeasuredRows", "MeasuredText", "add_measured_text_arguments", "measured_rows", "measured_text",
           "recorded_data"]


def recorded_data(checkpoint: str) -> Optional[Any]:
    """:func:`bilinear_lens.training.measured_text.recorded_data`, errors as :class:`UsageError`."""
    try:
        return library.recorded_data(checkpoint)
    except library.MeasuredTextError as err:
        raise UsageError(str(err)) from None


def measured_text(text_file: Optional[str], checkpoint: str, n_texts: Optional[int], seed: int = 0,
                  documents: str = "auto", fallback_n_texts: int = DEFAULT_N_TEXTS) -> MeasuredText:
    """:func:`bilinear_lens.training.measured_text.measured_text`, errors as :class:`UsageError`."""
    try:
        return library.measured_text(text_file, checkpoint, n_texts, seed, documents, fallback_n_texts)
    except library.MeasuredTextError as err:
        raise UsageError(str(err)) from None


def add_measured_text_arguments(parser: argparse.ArgumentParser) -> None:
    """``--text-file``, ``--documents``, ``--n-texts``, ``--max-tokens``, ``--seq-len``, ``--seed``
    with the library's defaults (:func:`measured_rows`)."""
    parser.add_argument("--text-file", help="UTF-8 text file of documents (default: the model's own training "
                        "data as its checkpoint records it; synthetic stories when it records none)")
    add_documents_argument(parser)
    parser.add_argument("--n-texts", type=int, default=DEFAULT_N_TEXTS,
                        help=f"documents to use (default {DEFAULT_N_TEXTS})")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"use at most this many text tokens of those documents (default {DEFAULT_MAX_TOKENS}; "
                             "BOS not counted)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens per row, at most the model's n_ctx (default {DEFAULT_SEQ_LEN}, or n_ctx if smaller)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic-story (and resample) seed (default 0)")


def measured_rows(args: argparse.Namespace, model: Any, progress: bool) -> MeasuredRows:
    """:func:`bilinear_lens.training.measured_text.measured_rows` of the flags above; a
    ``--documents`` rule without ``--text-file`` (it would be ignored), a ``--seq-len`` above n_ctx, an unreadable text or a text shorter than one row is a
    :class:`UsageError` naming the flag."""
    n_ctx = model.cfg.n_ctx
    if args.text_file is None and args.documents != "auto":
        raise UsageError(f"--documents {args.documents} applies to --text-file only; without it the model's own "
                         "training data is split as its run recorded (data.documents); give --text-file too")
    if args.seq_len is not None and args.seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2 (the loss needs a next token), got {args.seq_len}")
    if args.seq_len is not None and args.seq_len > n_ctx:
        raise UsageError(f"--seq-len {args.seq_len} is longer than the model's n_ctx {n_ctx}; give at most {n_ctx}")
    try:
        return library.measured_rows(model, args.checkpoint, args.text_file, args.n_texts, args.max_tokens,
                                     args.seq_len, args.seed, args.documents, progress)
    except library.MeasuredTextError as err:
        raise UsageError(str(err)) from None
    except ValueError as err:  # a stream shorter than one row
        raise UsageError(str(err).replace("seq_len", "--seq-len")) from None
