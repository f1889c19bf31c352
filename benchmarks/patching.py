"""Batched head x position patching grid vs TransformerLens' serial loop, side by side.

    python -m benchmarks.patching [--n-layers 4] [--pos 32] [--d-model 64] [--n-heads 8]
                                  [--batch 1] [--d-vocab 512] [--max-batch 0] [--repeats 1]
                                  [--threads 0] [--on model|bridge]

Both sides compute ``get_act_patch_attn_head_out_by_pos`` (patch each head's ``hook_z`` at
each position from a clean run into a corrupted run; a logit-difference metric per
prompt, ``reduce="none"``) on the same seeded model and prompts:
``transformer_lens.patching`` runs one forward per cell, our
:func:`~bilinear_lens.circuits.patching.batched_activation_patch` stacks the cells on the
batch axis (``--max-batch`` rows per forward, 0 = the default memory budget). Each side is
timed ``--repeats`` times (best kept); the ratio (serial / batched) and the largest
difference are printed, and the exit status is 1 if they disagree.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import torch
import transformer_lens.patching as tl_patching

from bilinear_lens.circuits.patching import batched_activation_patch
from bilinear_lens.models.bridge import to_bridge
from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.model import BilinearTransformer

# float32: both sides run the same per-row operations; batch-size dependent matmul blocking
# changes a few ulps (measured <= 1e-6 on logit differences ~1), far below this.
DISAGREE = 1e-4


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run(n_layers: int = 4, pos: int = 32, d_model: int = 64, n_heads: int = 8, batch: int = 1, d_vocab: int = 512,
        max_batch: int = 0, repeats: int = 1, on: str = "model") -> dict:
    cfg = ModelConfig(d_vocab=d_vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_ctx=max(pos, 16), seed=0)
    model: Any = BilinearTransformer(cfg).eval()
    if on == "bridge":
        model = to_bridge(model).eval()
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, d_vocab, (batch, pos), generator=gen)
    corrupted = torch.randint(0, d_vocab, (batch, pos), generator=gen)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[:, -1, 1] - logits[:, -1, 2]

    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    serial_s, serial = _best(lambda: tl_patching.get_act_patch_attn_head_out_by_pos(
        model, corrupted, cache, metric, reduce="none").values, repeats)
    batched_s, batched = _best(lambda: batched_activation_patch(
        model, corrupted, cache, metric, "attn_head_out_by_pos", reduce="none", max_batch=max_batch or None,
        progress=False).values, repeats)
    cells = n_layers * pos * n_heads
    return {"cells": cells, "serial_s": serial_s, "batched_s": batched_s, "ratio": serial_s / batched_s,
            "max_diff": float((serial - batched).abs().max()), "scale": float(serial.abs().max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--pos", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-heads", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--d-vocab", type=int, default=512)
    parser.add_argument("--max-batch", type=int, default=0, help="batch rows per batched forward (0: memory budget)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--on", choices=("model", "bridge"), default="model", help="our model or to_bridge(model)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(args.n_layers, args.pos, args.d_model, args.n_heads, args.batch, args.d_vocab, args.max_batch,
            args.repeats, args.on)
    print(f"head x position grid on {args.on}: {args.n_layers} layers x {args.pos} positions x {args.n_heads} heads "
          f"= {r['cells']} cells, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"  TransformerLens serial (get_act_patch_attn_head_out_by_pos): {r['serial_s']:.3f} s")
    print(f"  batched (batched_activation_patch):                          {r['batched_s']:.3f} s")
    print(f"  ratio (serial/batched): {r['ratio']:.1f}x")
    print(f"  max |difference|: {r['max_diff']:.3g} (values up to {r['scale']:.3g})")
    return 0 if r["max_diff"] <= DISAGREE else 1


if __name__ == "__main__":
    raise SystemExit(main())
