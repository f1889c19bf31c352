"""RegionCounts (numpy id counter) and the row-block threading used to pack spline codes."""

import multiprocessing
import sys
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from bilinear_lens.activations.region_counts import RegionCounts
from bilinear_lens.activations.row_threads import for_row_blocks
from bilinear_lens.activations.spline_codes import pack_bits, pack_signs, region_ids

# The module (the package re-exports a function of the same name).
spline_codes_module = sys.modules["bilinear_lens.activations.spline_codes"]


def _stream(seed: int, n_batches: int = 9) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Heavy repeats (small ids) mixed with full-range ids, so merges hit and miss.
    return [
        np.concatenate([rng.integers(0, 50, 300), rng.integers(0, 2**63, 40, dtype=np.int64)]).astype(np.uint64)
        for _ in range(n_batches)
    ]


@pytest.mark.parametrize("min_buffer", [1, 64, 1 << 16])
def test_counts_equal_a_counter_for_any_merge_schedule(min_buffer):
    counts, reference = RegionCounts(min_buffer=min_buffer), Counter()
    for batch in _stream(0):
        counts.add(batch)
        reference.update(batch.tolist())
        query = np.concatenate([batch[:20], np.array([2**64 - 1, 12345678901], dtype=np.uint64)])
        assert counts.get(query).tolist() == [reference.get(i, 0) for i in query.tolist()]
    assert counts.to_counter() == reference
    assert len(counts) == len(reference) and counts.total == sum(reference.values())
    ids, sizes = counts.ids_and_counts()
    assert bool((np.diff(ids.astype(np.float64)) > 0).all()) and sizes.sum() == counts.total
    with pytest.raises(ValueError):
        ids[0] = 1  # a read-only view, not the table


def test_most_common_orders_by_count_then_id():
    counts = RegionCounts(min_buffer=4)
    counts.add(np.array([9, 9, 9, 4, 4, 7, 7, 1, 8], dtype=np.uint64))
    counts.add(torch.tensor([4, 2]))  # a tensor of ints is accepted
    assert counts.most_common(3) == [(4, 3), (9, 3), (7, 2)]
    assert counts.most_common(100)[-3:] == [(1, 1), (2, 1), (8, 1)]
    assert counts.most_common(0) == [] and RegionCounts().most_common(5) == []
    stream = np.concatenate(_stream(1))
    counts = RegionCounts(min_buffer=100)
    counts.add(stream)
    expected = sorted(Counter(stream.tolist()).items(), key=lambda item: (-item[1], item[0]))[:25]
    assert counts.most_common(25) == expected


def test_counts_reject_bad_ids():
    counts = RegionCounts()
    with pytest.raises(TypeError, match="integers"):
        counts.add(np.array([1.5]))
    with pytest.raises(ValueError, match="non-negative"):
        counts.add(np.array([3, -1]))
    with pytest.raises(ValueError, match="min_buffer"):
        RegionCounts(min_buffer=0)
    counts.add(np.array([], dtype=np.uint64))
    assert len(counts) == 0 and counts.total == 0


def test_add_copies_its_input():
    counts, ids = RegionCounts(), np.array([5, 5, 6], dtype=np.uint64)
    counts.add(ids)
    ids[:] = 0  # the caller reuses its buffer before the merge
    assert counts.to_counter() == Counter({5: 2, 6: 1})


# ---- row blocks and threaded packing -------------------------------------------------------


@pytest.mark.parametrize("n_rows, min_rows, n_threads", [(0, 1, 2), (1, 1, 4), (10, 1, 3), (1001, 100, 4), (50, 100, 2)])
def test_row_blocks_cover_every_row_once(n_rows, min_rows, n_threads):
    seen = np.zeros(n_rows, dtype=np.int64)
    blocks: list[tuple[int, int]] = []
    callers: set[str] = set()

    def mark(start: int, stop: int) -> None:
        seen[start:stop] += 1
        blocks.append((start, stop))
        callers.add(threading.current_thread().name)

    for_row_blocks(mark, n_rows, min_rows_per_thread=min_rows, n_threads=n_threads)
    assert bool((seen == 1).all())
    n_blocks = max(1, min(n_threads, n_rows // min_rows))
    assert len(blocks) == n_blocks and "MainThread" in callers  # the caller takes a block too
    assert n_blocks == 1 or min(stop - start for start, stop in blocks) >= min_rows


def test_row_block_errors_reach_the_caller():
    def fail_late(start: int, stop: int) -> None:
        if start > 0:
            raise RuntimeError(f"block at row {start} failed")

    with pytest.raises(RuntimeError, match="block at row"):
        for_row_blocks(fail_late, 100, min_rows_per_thread=10, n_threads=2)
    with pytest.raises(ValueError, match="n_threads"):
        for_row_blocks(fail_late, 100, min_rows_per_thread=10, n_threads=0)


@pytest.mark.parametrize("shape", [(3, 333, 13), (1000, 64), (7, 1)])
def test_threaded_pack_signs_matches_single_thread_bit_for_bit(monkeypatch, shape):
    monkeypatch.setattr(spline_codes_module, "_PARALLEL_MIN_VALUES", 64)  # force several threads on small input
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    x.view(-1)[::7] = 0.0  # exact zeros are off
    expected = pack_bits(x > 0)
    for n_threads in (1, 2, 3):
        assert torch.equal(pack_signs(x, n_threads=n_threads), expected)


@pytest.mark.parametrize("n_bytes", [3, 8, 40])
def test_threaded_region_ids_match_single_thread(monkeypatch, n_bytes):
    monkeypatch.setattr(spline_codes_module, "_PARALLEL_MIN_WORDS", 4)  # force several threads
    codes = torch.randint(0, 256, (2, 301, n_bytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(n_bytes))
    expected = region_ids(codes, n_threads=1)
    assert expected.shape == (2, 301) and len(set(expected.ravel().tolist())) == 602
    for n_threads in (2, 3):
        assert np.array_equal(region_ids(codes, n_threads=n_threads), expected)
    assert np.array_equal(region_ids(codes[1, 7:90]), expected[1, 7:90])  # an id depends on its code alone


def _pack_in_child(queue: "multiprocessing.Queue[bool]") -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: torch's OpenMP pool does not survive fork
    x = torch.randn(4000, 32, generator=torch.Generator().manual_seed(3))
    queue.put(bool(torch.equal(pack_signs(x, n_threads=2), pack_bits(x > 0))))


def test_threaded_packing_works_in_a_forked_child(monkeypatch):
    # The parent's pool threads do not exist in a forked child (DDP, DataLoader workers):
    # the child must build its own pool instead of waiting on dead threads.
    monkeypatch.setattr(spline_codes_module, "_PARALLEL_MIN_VALUES", 64)
    pack_signs(torch.randn(4000, 32), n_threads=2)  # the parent's pool now exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_pack_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0 and queue.get(timeout=5) is True


def _counted(batches: list[np.ndarray], min_buffer: int = 64) -> RegionCounts:
    table = RegionCounts(min_buffer=min_buffer)
    for batch in batches:
        table.add(batch)
    return table


def test_merge_is_associative_commutative_and_equals_counting_the_whole_stream():
    stream = _stream(3, n_batches=12)
    a, b, c = _counted(stream[:4]), _counted(stream[4:9], min_buffer=1), _counted(stream[9:])
    whole = Counter(np.concatenate(stream).tolist())
    for merged in (a.merge(b).merge(c), a.merge(b.merge(c)), c.merge(a).merge(b)):
        assert merged.to_counter() == whole
        assert merged.total == sum(whole.values())
    left, right = a.merge(b).merge(c).ids_and_counts(), a.merge(b.merge(c)).ids_and_counts()
    assert np.array_equal(left[0], right[0]) and np.array_equal(left[1], right[1])
    assert a.to_counter() == Counter(np.concatenate(stream[:4]).tolist())  # inputs unchanged
    assert a.merge(RegionCounts()).to_counter() == a.to_counter()  # the empty table is the identity


def test_from_ids_and_counts_round_trips_and_rejects_bad_counts():
    table = _counted(_stream(4))
    ids, counts = table.ids_and_counts()
    shuffled = np.random.default_rng(0).permutation(ids.size)
    copy = RegionCounts.from_ids_and_counts(ids[shuffled], counts[shuffled])
    assert copy.to_counter() == table.to_counter() and copy.total == table.total
    with pytest.raises(ValueError, match="need one positive count per id"):
        RegionCounts.from_ids_and_counts(np.array([1, 2], dtype=np.uint64), np.array([1, 0]))
