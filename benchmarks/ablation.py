"""Batched single-neuron ablation sweep vs a Python loop of one forward pass per neuron.

    python -m benchmarks.ablation [--d-model 64] [--d-mlp 256] [--batch 8] [--pos 64]
                                  [--n-layers 2] [--layer 0] [--d-vocab 512]
                                  [--ablations-per-pass 0] [--repeats 3] [--threads 0]

Both sides zero-ablate every neuron of layer ``--layer`` at ``hook_post`` on the same tokens and
compute the mean next-token loss of each ablated run; the loop uses
:func:`~bilinear_lens.ablation.ablate_neurons` around ``model(tokens)``, the sweep
:func:`~bilinear_lens.ablation.ablation_sweep`. Each side is timed ``--repeats`` times
(best kept) after one warm-up, and the results are checked to agree before the speed
ratio (loop time / sweep time) is printed. The sweep runs the blocks before ``--layer``
once (``start_at_layer``), so late layers of deep models gain the most; try
``--n-layers 6 --layer 5``.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

from bilinear_lens.ablation import ablate_neurons, ablation_sweep, loss_metric
from bilinear_lens.config import ModelConfig
from bilinear_lens.model import build_model


def _best_time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    result = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-mlp", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--layer", type=int, default=0, help="the layer whose neurons are swept")
    parser.add_argument("--d-vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=64)
    parser.add_argument("--ablations-per-pass", type=int, default=0, help="0: the library default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig(
        d_vocab=args.d_vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=4,
        d_mlp=args.d_mlp, n_ctx=args.pos, seed=0,
    )
    model = build_model(cfg).eval()
    tokens = torch.randint(0, cfg.d_vocab, (args.batch, args.pos), generator=torch.Generator().manual_seed(0))
    per_pass = args.ablations_per_pass or None
    loss = loss_metric(tokens)

    def loop() -> torch.Tensor:
        out = torch.empty(cfg.d_mlp, dtype=torch.float64)
        with torch.no_grad():
            clean = float(loss(model(tokens)))
            for neuron in range(cfg.d_mlp):
                with ablate_neurons(model, args.layer, [neuron]):
                    out[neuron] = float(loss(model(tokens))) - clean
        return out

    def sweep() -> torch.Tensor:
        return ablation_sweep(model, tokens, args.layer, ablations_per_pass=per_pass, progress=False)["delta_loss"]

    t_loop, loop_result = _best_time(loop, args.repeats)
    t_sweep, sweep_result = _best_time(sweep, args.repeats)
    max_diff = float((loop_result - sweep_result).abs().max())

    print(
        f"layer {args.layer} of d_model={cfg.d_model} d_mlp={cfg.d_mlp} n_layers={cfg.n_layers} d_vocab={cfg.d_vocab}; "
        f"tokens {args.batch} x {args.pos}; torch threads {torch.get_num_threads()}"
    )
    print(f"loop  (1 forward / neuron)     {t_loop:8.3f} s   {cfg.d_mlp / t_loop:8.1f} neurons/s")
    print(f"sweep (batched)                {t_sweep:8.3f} s   {cfg.d_mlp / t_sweep:8.1f} neurons/s")
    print(f"speed ratio loop / sweep       {t_loop / t_sweep:8.2f}x")
    print(f"max |delta_loss| difference    {max_diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
