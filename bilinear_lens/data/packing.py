"""Text to token rows: the one packing rule, training's (:mod:`bilinear_lens.data.corpus`).

Every reader of text for a model (training, ``ablate``, ``polytope``, the purity analysis,
notebook 04) packs it the same way::

    documents   text split by the document rule (:func:`bilinear_lens.data.documents.split_text`)
    stream      each document's tokens preceded by BOS, concatenated (:func:`document_stream`)
    rows        the stream cut into consecutive rows of ``n_ctx`` tokens: no BOS at every row
                start, no padding; when ``n_ctx`` does not divide the stream, the last row is
                its final ``n_ctx`` tokens (:func:`stream_rows`)
    mask        which positions to count: a row that starts mid-document lacks the context of
                its first tokens, so its first ``warmup`` positions (up to its first BOS) are
                not counted, nor the tokens the last row repeats (:func:`count_mask`)

:func:`pack_documents` does all of it, with a cap on the text tokens run, and says how many
tokens were read, cut and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Int
from torch import Tensor

__all__ = ["PackedText", "count_mask", "document_stream", "pack_documents", "stream_rows"]


def document_stream(tokenizer: Any, documents: Sequence[str]) -> list[int]:
    """The token stream of ``documents``, the way training packs its corpus
    (:mod:`bilinear_lens.data.corpus`): each document's tokens (no special tokens added),
    preceded by the BOS token when the tokenizer has one. Every token of every document is
    in it."""
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    stream: list[int] = []
    for text in documents:
        stream.extend(bos)
        stream.extend(tokenizer.encode(text, add_special_tokens=False))
    return stream


def stream_rows(stream: Sequence[int], length: int, what: str = "length") -> tuple[Int[Tensor, "n_rows length"], int]:
    """``(rows [n_rows, length], overlap)``: ``stream`` cut into consecutive rows of
    ``length`` tokens, none padded and none dropped. When ``length`` does not divide the
    stream, the last row is the stream's final ``length`` tokens, so it repeats ``overlap``
    tokens of the row before (0 when it divides). A stream shorter than one row is a
    ``ValueError`` naming ``what`` (the setting that chose ``length``)."""
    if len(stream) < length:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than one row of {what} {length}")
    n_full, rest = divmod(len(stream), length)
    ids = torch.tensor(list(stream), dtype=torch.long)
    rows = ids[: n_full * length].view(n_full, length)
    if rest:
        rows = torch.cat([rows, ids[-length:][None]])
    return rows, (length - rest) % length


def count_mask(
    rows: Int[Tensor, "n_rows pos"], bos_token_id: Optional[int], warmup: int, overlap: int = 0
) -> Bool[Tensor, "n_rows pos"]:
    """Which positions of packed ``rows`` (:func:`stream_rows` of a :func:`document_stream`)
    to count as tokens of an analysis.

    A row that starts mid-document (not row 0, first token not BOS) lacks the context of
    its first tokens: its positions before ``warmup`` (or before its first BOS, if earlier)
    are False, so row-start tokens with no context do not pile into shared regions. When
    ``stream_rows`` made the last row repeat ``overlap`` tokens of the row before, those
    are False too (counted once). BOS itself is left to the caller (e.g. ``ignore_tokens``)."""
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    ids = np.asarray(rows.detach().cpu() if isinstance(rows, Tensor) else rows).astype(np.int64)
    n_rows, n_pos = ids.shape
    mask = np.ones((n_rows, n_pos), dtype=bool)
    is_bos = ids == bos_token_id if bos_token_id is not None else np.zeros_like(mask)
    first_bos = np.where(is_bos.any(axis=1), is_bos.argmax(axis=1), n_pos)
    mid_document = ~is_bos[:, 0]
    mid_document[0] = False
    stop = np.where(mid_document, np.minimum(first_bos, warmup), 0)
    mask &= np.arange(n_pos)[None, :] >= stop[:, None]
    if overlap and n_rows > 1:
        mask[-1, :overlap] = False
    return torch.from_numpy(mask)


@dataclass
class PackedText:
    """Packed documents: ``rows [n_rows, n_ctx]`` (one shorter row when the text is shorter
    than ``n_ctx``), ``mask`` (:func:`count_mask`), and ``counts``: ``tokens_read`` (text
    tokens, BOS not counted), ``max_tokens``, ``tokens_beyond_max`` (not run), ``warmup``,
    ``tokens_skipped_row_start`` (run, but masked out at row starts or as the overlap)."""

    rows: Int[Tensor, "n_rows n_ctx"]
    mask: Bool[Tensor, "n_rows n_ctx"]
    counts: dict[str, int]


def pack_documents(
    tokenizer: Any, documents: Sequence[str], n_ctx: int, max_tokens: Optional[int] = None, warmup: int = 8,
) -> PackedText:
    """``documents`` packed by the one rule (module docstring), keeping only the first
    ``max_tokens`` text tokens (``None``: all). No text tokens at all is a ``ValueError``."""
    bos = tokenizer.bos_token_id
    stream = np.asarray(document_stream(tokenizer, documents), dtype=np.int64)
    is_text = stream != bos if bos is not None else np.ones(stream.size, dtype=bool)
    n_read = int(is_text.sum())
    if n_read == 0:
        raise ValueError("the documents hold no tokens")
    max_tokens = n_read if max_tokens is None else max_tokens
    if n_read > max_tokens:
        stream = stream[: int(np.flatnonzero(is_text)[max_tokens - 1]) + 1]
    if stream.size < n_ctx:
        rows, overlap = torch.from_numpy(stream)[None], 0
    else:
        rows, overlap = stream_rows(stream.tolist(), n_ctx, "n_ctx")
    mask = count_mask(rows, bos, warmup, overlap)
    n_run = min(n_read, max_tokens)
    counted = mask & (rows != bos) if bos is not None else mask
    counts = {"tokens_read": n_read, "max_tokens": max_tokens, "tokens_beyond_max": n_read - n_run,
              "warmup": warmup, "tokens_skipped_row_start": n_run - int(counted.sum())}
    return PackedText(rows, mask, counts)
