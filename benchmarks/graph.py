"""Attribution-graph build time at the README's ``tiny`` size with a 32-token prompt.

    python -m benchmarks.graph [--positions 32] [--chunk-size 64] [--repeats 3] [--threads 0]

The model has the dims of ``training/configs/tiny.toml`` (2 layers, d_model 64, 4 heads,
d_mlp 192, rotary, RMSPre; d_vocab 1024, the recipe's requested vocabulary) with its
initial weights: build time does not depend on training. For each split (``none``,
``neurons``, ``eigen``) and dtype it prints nodes, edges, the best of ``--repeats`` build
times, nodes/s, the completeness error (max |value - sum of incoming edges|, should be ~1e-15
in float64) and the pruned graph's size (node 0.8, edge 0.98).
"""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path

import torch

from bilinear_lens.circuits.graph import attribution_graph
from bilinear_lens.circuits.graph_prune import prune_graph
from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.model import build_model

RECIPE = Path(__file__).resolve().parents[1] / "training" / "configs" / "tiny.toml"


def tiny_model(dtype: str) -> torch.nn.Module:
    """The ``tiny`` recipe's model section (d_vocab, left to the tokenizer there, is 1024)."""
    fields = tomllib.loads(RECIPE.read_text())["model"]
    return build_model(ModelConfig(d_vocab=1024, dtype=dtype, **fields)).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.graph", description=__doc__.split("\n\n")[0])
    p.add_argument("--positions", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"tiny model ({RECIPE.name}), {args.positions}-token prompt, chunk {args.chunk_size}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")  # fmt: skip
    print(f"{'dtype':<8} {'split':<8} {'nodes':>6} {'edges':>7} {'seconds':>8} {'nodes/s':>8} {'complete err':>12} {'pruned':>14}")
    for dtype in ("float32", "float64"):
        model = tiny_model(dtype)
        tokens = torch.randint(0, model.cfg.d_vocab, (1, args.positions), generator=torch.Generator().manual_seed(0))
        for split in ("none", "neurons", "eigen"):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                graph = attribution_graph(model, tokens, split=split, chunk_size=args.chunk_size)
                best = min(best, time.perf_counter() - start)
            pruned = prune_graph(graph)
            print(f"{dtype:<8} {split:<8} {len(graph.nodes):>6} {graph.n_edges:>7} {best:>8.3f} {len(graph.nodes) / best:>8.0f} "
                  f"{graph.completeness_error():>12.2e} {f'{len(pruned.nodes)}n/{pruned.n_edges}e':>14}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
