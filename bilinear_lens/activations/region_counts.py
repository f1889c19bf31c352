"""Counts of 64-bit region ids in numpy arrays, for streams of millions of tokens.

A ``collections.Counter`` costs a Python int and a dict probe per token; at d_mlp 2048
almost every token is its own region, so that probe into a dict of millions of entries
dominated region tracking. :class:`RegionCounts` keeps the distinct ids sorted in one
``uint64`` array with their counts beside them, and buffers incoming ids: when the buffer
holds as many ids as the table (at least ``min_buffer``), it is sorted, run-length
counted and merged in (a linear merge of two sorted runs). Each id costs amortised
O(log n) numpy work and no Python object; 16 bytes per distinct id, and a merge briefly
needs a few times the table.
"""

from __future__ import annotations

from collections import Counter
from typing import Union

import numpy as np
from jaxtyping import Int, UInt64
from torch import Tensor

IdsLike = Union[np.ndarray, Tensor]


class RegionCounts:
    """Multiset of ``uint64`` ids: ``add`` batches, look counts up, rank the largest."""

    def __init__(self, min_buffer: int = 1 << 16):
        if min_buffer < 1:
            raise ValueError(f"min_buffer must be >= 1, got {min_buffer}")
        self.min_buffer = min_buffer
        self._ids = np.empty(0, dtype=np.uint64)  # sorted, distinct
        self._counts = np.empty(0, dtype=np.int64)
        self._buffer: list[np.ndarray] = []
        self._n_buffered = 0
        self.total = 0

    def add(self, ids: UInt64[IdsLike, "..."]) -> None:
        """Count every element of ``ids`` once (any shape; copied, so the caller may reuse it)."""
        array = _as_ids(ids).ravel().copy()
        if array.size == 0:
            return
        self._buffer.append(array)
        self._n_buffered += array.size
        self.total += array.size
        if self._n_buffered >= max(self.min_buffer, self._ids.size):
            self._merge()

    def get(self, ids: UInt64[IdsLike, "..."]) -> Int[np.ndarray, "..."]:
        """Count of each id so far (0 for ids never added), same shape as ``ids``."""
        self._merge()
        query = _as_ids(ids)
        flat = query.ravel()
        pos = np.searchsorted(self._ids, flat)
        found = _found(self._ids, flat, pos)
        counts = np.zeros(flat.shape, dtype=np.int64)
        counts[found] = self._counts[pos[found]]
        return counts.reshape(query.shape)

    def __len__(self) -> int:
        self._merge()
        return int(self._ids.size)

    def ids_and_counts(self) -> tuple[UInt64[np.ndarray, "n"], Int[np.ndarray, "n"]]:
        """Distinct ids (ascending) and their counts, as read-only arrays."""
        self._merge()
        ids, counts = self._ids.view(), self._counts.view()
        ids.flags.writeable = counts.flags.writeable = False
        return ids, counts

    def most_common(self, n: int) -> list[tuple[int, int]]:
        """The ``n`` largest ``(id, count)`` pairs, by count descending then id ascending."""
        self._merge()
        if n <= 0 or self._ids.size == 0:
            return []
        candidates = np.arange(self._ids.size)
        if n < self._ids.size:  # keep every id tied with the n-th largest, then order exactly
            threshold = np.partition(self._counts, self._ids.size - n)[self._ids.size - n]
            candidates = np.flatnonzero(self._counts >= threshold)
        order = candidates[np.lexsort((self._ids[candidates], -self._counts[candidates]))][:n]
        return list(zip(self._ids[order].tolist(), self._counts[order].tolist()))

    def to_counter(self) -> Counter[int]:
        """A ``collections.Counter`` snapshot (one Python entry per distinct id)."""
        self._merge()
        return Counter(dict(zip(self._ids.tolist(), self._counts.tolist())))

    def merge(self, other: "RegionCounts") -> "RegionCounts":
        """A new table counting every id of ``self`` and ``other`` (neither changes).

        Counts add, so merging is associative and commutative: tables counted on separate
        shards of a stream (e.g. one per process) merge into the table of the whole stream.
        """
        self._merge()
        other._merge()
        merged = RegionCounts(self.min_buffer)
        merged._ids, merged._counts = _merge_sorted(self._ids, self._counts, other._ids, other._counts)
        merged.total = self.total + other.total
        return merged

    @classmethod
    def from_ids_and_counts(cls, ids: UInt64[IdsLike, "n"], counts: Int[np.ndarray, "n"]) -> "RegionCounts":
        """A table from distinct ``ids`` and positive ``counts`` (e.g. :meth:`ids_and_counts`
        of another process), in any order."""
        ids, counts = _as_ids(ids).ravel(), np.asarray(counts, dtype=np.int64).ravel()
        if ids.shape != counts.shape or (counts.size and counts.min() < 1):
            raise ValueError(f"need one positive count per id, got {ids.size} ids and counts {counts[:5]}...")
        order = np.argsort(ids, kind="stable")
        table = cls()
        table._ids, table._counts = _run_lengths(ids[order], counts[order])
        table.total = int(counts.sum())
        return table

    def _merge(self) -> None:
        if not self._buffer:
            return
        new = np.concatenate(self._buffer)
        self._buffer, self._n_buffered = [], 0
        new.sort()
        unique, counts = _run_lengths(new, np.ones(new.size, dtype=np.int64))
        self._ids, self._counts = _merge_sorted(self._ids, self._counts, unique, counts)


def _merge_sorted(
    ids_a: UInt64[np.ndarray, "a"], counts_a: Int[np.ndarray, "a"], ids_b: UInt64[np.ndarray, "b"], counts_b: Int[np.ndarray, "b"]
) -> tuple[UInt64[np.ndarray, "m"], Int[np.ndarray, "m"]]:
    """Two sorted distinct-id tables as one, counts of shared ids summed."""
    ids = np.concatenate([ids_a, ids_b])
    # Two sorted runs: the stable sort (timsort) merges them in linear time. An id in
    # both ends up as two neighbours, first table's entry first.
    order = np.argsort(ids, kind="stable")
    return _run_lengths(ids[order], np.concatenate([counts_a, counts_b])[order])


def _run_lengths(
    sorted_ids: UInt64[np.ndarray, "n"], weights: Int[np.ndarray, "n"]
) -> tuple[UInt64[np.ndarray, "m"], Int[np.ndarray, "m"]]:
    """Distinct ids of a sorted array and the summed weights of each id's run."""
    if sorted_ids.size == 0:
        return sorted_ids, weights
    starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
    if starts.size == sorted_ids.size:
        return sorted_ids, weights
    return sorted_ids[starts], np.add.reduceat(weights, starts)


def _as_ids(ids: IdsLike) -> np.ndarray:
    array = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    if array.dtype != np.uint64:
        if array.dtype.kind not in "iu":
            raise TypeError(f"region ids must be integers, got {array.dtype}")
        if array.dtype.kind == "i" and array.size and array.min() < 0:
            raise ValueError("region ids must be non-negative")
        array = array.astype(np.uint64)
    return array


def _found(table: np.ndarray, keys: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Where ``table[pos] == keys`` (``pos`` from ``searchsorted``; past-the-end is not found)."""
    found = pos < table.size
    found[found] = table[pos[found]] == keys[found]
    return found
