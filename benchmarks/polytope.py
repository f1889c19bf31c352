"""Throughput and memory of spline codes + region counting at ``d_mlp`` 2048.

    python -m benchmarks.polytope [--tokens 262144] [--d-mlp 2048] [--batch 4096] [--d-model 0] [--threads 0]

Pre-activations are random normal (every token in its own region: the worst case for the
region counter) or, with ``--d-model N``, ``x @ W_in`` of a random ``N x d_mlp`` layer (the
matmul is timed separately). Three pipelines run on the same batches:

- ``packed``: :func:`pack_signs` (1 bit per neuron, rows split over ``torch.get_num_threads()``
  threads) -> :meth:`RegionTracker.update` (:func:`region_ids`, numpy count table, Hamming
  reservoir);
- ``packed, 1 thread``: the same with ``torch.set_num_threads(1)`` (no row threading);
- ``bool``: ``pre > 0`` kept unpacked (1 byte per neuron), hashed the same way ->
  ``collections.Counter`` (the straightforward implementation).

Only the pipelines are timed (generating the batches is not). Reports token-codes/s and the
memory a stored code takes per token per neuron.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch

from bilinear_lens.activations.polytope import RegionTracker
from bilinear_lens.activations.spline_codes import pack_signs, region_ids

# (make codes from pre-activations, count the codes' regions)
Stages = tuple[Callable[[torch.Tensor], Any], Callable[[Any], None]]


def _bool_codes(pre: torch.Tensor) -> np.ndarray:
    return np.greater(pre.numpy(), 0)


def _packed_stages(tracker: RegionTracker) -> Stages:
    return (pack_signs, lambda codes: tracker.update(codes.numpy()))


def _on_one_thread(stages: Stages) -> Stages:
    """The same stages with ``torch.get_num_threads() == 1``, which the library's row threading follows."""

    def serial(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        def run(value: Any) -> Any:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return fn(value)
            finally:
                torch.set_num_threads(threads)

        return run

    return (serial(stages[0]), serial(stages[1]))


def _bool_stages(counter: Counter) -> Stages:
    # The same hash on the unpacked bytes: 8x more words to mix.
    return (_bool_codes, lambda codes: counter.update(region_ids(codes.view(np.uint8)).tolist()))


def _timed(stages: Stages, pre: torch.Tensor) -> tuple[float, float, int]:
    """(seconds to make the codes, seconds to count them, bytes per code)."""
    start = time.perf_counter()
    codes = stages[0](pre)
    made = time.perf_counter()
    stages[1](codes)
    return made - start, time.perf_counter() - made, codes.shape[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 18)
    parser.add_argument("--d-mlp", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=0, help="0: random pre-activations; N: x @ W_in with d_model N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads, also used to pack codes (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(args.seed)
    n_batches = max(1, args.tokens // args.batch)
    n_tokens = n_batches * args.batch
    W_in = torch.randn(args.d_model, args.d_mlp, generator=gen) / args.d_model**0.5 if args.d_model else None
    tracker = RegionTracker(examples_per_region=0, hamming_sample=1024)
    serial_tracker = RegionTracker(examples_per_region=0, hamming_sample=1024)
    counter: Counter = Counter()
    pipelines = {
        "packed": _packed_stages(tracker),
        "packed, 1 thread": _on_one_thread(_packed_stages(serial_tracker)),
        "bool (baseline)": _bool_stages(counter),
    }
    matmul_s = 0.0
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
    code_bytes: dict[str, int] = {}
    for i in range(n_batches):  # one batch in memory at a time; every pipeline sees it
        if W_in is None:
            pre = torch.randn(args.batch, args.d_mlp, generator=gen)
        else:
            x = torch.randn(args.batch, args.d_model, generator=gen)
            start = time.perf_counter()
            pre = x @ W_in
            matmul_s += time.perf_counter() - start
        names = list(pipelines)
        for name in names[i % len(names) :] + names[: i % len(names)]:  # rotate who reads the fresh batch first
            make_s, count_s, code_bytes[name] = _timed(pipelines[name], pre)
            times[name].append((make_s, count_s))
    # Different bytes hash to different ids, but the partition must be the same.
    if tracker.counts != serial_tracker.counts or sorted(tracker.counts.values()) != sorted(counter.values()):
        raise AssertionError("the pipelines disagree on region counts")

    print(f"{n_tokens} tokens x d_mlp {args.d_mlp}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    if W_in is not None:
        print(f"  (pre-activations from a d_model {args.d_model} layer: matmul {n_tokens / matmul_s / 1e6:.2f} M tokens/s, not included)")
    print(f"  distinct regions: {tracker.n_regions}")
    print(f"  {'codes':<17} {'M token-codes/s':>16} {'median batch':>13} {'make codes':>11} {'count':>8} {'bits/token/neuron':>18}")
    total: dict[str, float] = {}
    for name, per_batch in times.items():
        make, count = np.array(per_batch).T
        total[name] = float(make.sum() + count.sum())
        median_rate = args.batch / np.median(make + count)
        print(
            f"  {name:<17} {n_tokens / total[name] / 1e6:>16.2f} {median_rate / 1e6:>13.2f} "
            f"{n_tokens / make.sum() / 1e6:>11.2f} {n_tokens / count.sum() / 1e6:>8.2f} {code_bytes[name] * 8 / args.d_mlp:>18.2f}"
        )
    ratio = total["bool (baseline)"] / total["packed"]
    print(f"  packed vs bool: {ratio:.2f}x throughput, {code_bytes['bool (baseline)'] / code_bytes['packed']:.0f}x less memory per code")
    print(f"  packed vs packed on 1 thread: {total['packed, 1 thread'] / total['packed']:.2f}x throughput")
    print("  (rates in M tokens/s; 'make codes' and 'count' are the two stages on their own)")


if __name__ == "__main__":
    main()
