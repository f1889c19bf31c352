"""Split row-wise numpy work across threads.

numpy releases the GIL inside its C loops, so contiguous blocks of rows processed by
separate threads run on separate cores. Used where one pass over a large activation
array is memory-bound (packing spline codes): one core does not saturate the memory bus.
The thread count follows ``torch.get_num_threads()``, so ``torch.set_num_threads`` (or
``OMP_NUM_THREADS``) controls this too.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

_pool: Optional[ThreadPoolExecutor] = None
_pool_key: tuple[int, int] = (0, 0)  # (pid, workers): a forked child must not reuse the parent's pool
_pool_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    with _pool_lock:
        pid = os.getpid()
        if _pool is None or _pool_key[0] != pid or _pool_key[1] < workers:
            if _pool is not None and _pool_key[0] == pid:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bilinear_lens_rows")
            _pool_key = (pid, workers)
        return _pool


def for_row_blocks(
    fn: Callable[[int, int], None], n_rows: int, min_rows_per_thread: int, n_threads: Optional[int] = None
) -> None:
    """Call ``fn(start, stop)`` on contiguous row blocks covering ``range(n_rows)``.

    Uses up to ``n_threads`` threads (default ``torch.get_num_threads()``), never giving a
    thread fewer than ``min_rows_per_thread`` rows: below that, starting a thread costs more
    than it saves. The calling thread takes the first block. ``fn`` must write disjoint
    outputs per block; exceptions propagate to the caller.
    """
    threads = torch.get_num_threads() if n_threads is None else n_threads
    if threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {threads}")
    threads = max(1, min(threads, n_rows // max(1, min_rows_per_thread)))
    if threads == 1:
        fn(0, n_rows)
        return
    bounds = [n_rows * i // threads for i in range(threads + 1)]
    pool = _executor(threads - 1)
    futures = [pool.submit(fn, bounds[i], bounds[i + 1]) for i in range(1, threads)]
    try:
        fn(bounds[0], bounds[1])
    finally:
        for future in futures:
            future.result()  # waits for every block, re-raises the first error
