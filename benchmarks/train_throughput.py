"""Training throughput (tokens/s) of the bilinear MLP against SwiGLU, ReLU and GELU.

Every model has the same dims (``d_model``, ``d_mlp``, layers, heads, context), so gated
kinds (bilinear, SwiGLU) do 3 MLP matmuls and plain kinds 2: the fair question for the
bilinear MLP is its speed relative to SwiGLU (same matmuls, one activation fewer); ReLU and
GELU are listed for scale. One training step is what :func:`bilinear_lens.training.loop.train`
runs: forward, next-token loss, backward, gradient clipping, AdamW step.

The kinds are measured side by side in one process: ``--repeats`` rounds, each timing every
kind for ``--steps`` steps in a rotated order (so drifts in machine load hit all kinds
alike), after ``--warmup`` untimed steps per kind. The median over rounds is reported.

    python -m benchmarks.train_throughput                 # CPU defaults, ~1 minute
    python -m benchmarks.train_throughput --device cuda --d-model 512 --d-mlp 2048 --n-layers 6 --batch 32
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch

from bilinear_lens.models.config import ModelConfig
from bilinear_lens.training.config import TrainConfig
from bilinear_lens.models.model import BilinearTransformer
from bilinear_lens.training.loop import compute_loss, make_optimizer

KINDS = ("bilinear", "swiglu", "relu", "gelu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(cfg: ModelConfig, batch: torch.Tensor, device: torch.device):
    """A closure running one training step of a fresh model of ``cfg`` on ``batch``."""
    model = BilinearTransformer(cfg).to(device)
    optimizer = make_optimizer(model, TrainConfig())

    def step() -> None:
        loss = compute_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(
    base: ModelConfig, batch_size: int, steps: int, warmup: int, repeats: int,
    device: torch.device, kinds: tuple[str, ...] = KINDS,
) -> dict[str, list[float]]:
    """Tokens/s of each kind, one value per round."""
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, base.d_vocab, (batch_size, base.n_ctx + 1), generator=gen).to(device)
    step_fns = {kind: make_step(base.replace(mlp_kind=kind), batch, device) for kind in kinds}
    for fn in step_fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    results: dict[str, list[float]] = {kind: [] for kind in kinds}
    tokens = steps * batch_size * base.n_ctx
    for r in range(repeats):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]
        for kind in order:
            t0 = time.perf_counter()
            for _ in range(steps):
                step_fns[kind]()
            _sync(device)
            results[kind].append(tokens / (time.perf_counter() - t0))
    return results


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--d-mlp", type=int, default=512)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-ctx", type=int, default=128)
    parser.add_argument("--d-vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per kind per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per kind")
    parser.add_argument("--repeats", type=int, default=5, help="rounds")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = ModelConfig(d_vocab=args.d_vocab, d_model=args.d_model, d_mlp=args.d_mlp, n_layers=args.n_layers,
                       n_heads=args.n_heads, n_ctx=args.n_ctx)
    results = measure(base, args.batch, args.steps, args.warmup, args.repeats, device)
    median = {kind: statistics.median(values) for kind, values in results.items()}
    print(f"device {device}, {torch.get_num_threads()} threads; d_model {args.d_model}, d_mlp {args.d_mlp}, "
          f"{args.n_layers} layers, n_ctx {args.n_ctx}, batch {args.batch}; "
          f"median of {args.repeats} rounds x {args.steps} steps")
    print(f"{'kind':<10} {'tokens/s':>10} {'min':>10} {'max':>10} {'vs swiglu':>10}")
    for kind in results:
        print(f"{kind:<10} {median[kind]:>10,.0f} {min(results[kind]):>10,.0f} {max(results[kind]):>10,.0f} "
              f"{median[kind] / median['swiglu']:>10.3f}")
    ratio = median["bilinear"] / median["swiglu"]
    print(f"bilinear/swiglu = {ratio:.3f} (goal >= 0.95)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
