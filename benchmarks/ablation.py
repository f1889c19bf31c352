"""Batched single-neuron ablation sweep vs a Python loop of one forward pass per neuron.

    python -m benchmarks.ablation [--d-model 64] [--d-mlp 256] [--batch 8] [--pos 64]
                                  [--n-layers 2] [--layer 0 | --all-layers] [--d-vocab 512]
                                  [--ablations-per-pass 0] [--repeats 3] [--threads 0]
                                  [--sae-feature]

Both sides zero-ablate every neuron of layer ``--layer`` at ``hook_post`` on the same tokens and
compute the mean next-token loss of each ablated run; the loop uses
:func:`~bilinear_lens.activations.ablation.ablate_neurons` around ``model(tokens)``, the sweep
:func:`~bilinear_lens.activations.ablation.ablation_sweep`. Each side is timed ``--repeats`` times
(best kept) after one warm-up; the speed ratio (loop time / sweep time) is printed with
the largest difference of the two results, and the exit status is 1 if they disagree.
The sweep runs everything before the ablated activation once and restarts each copy
inside the layer's MLP, so the ratio grows with the layer index; ``--all-layers``
measures every layer of the model in one run.

``--sae-feature`` reads an SAE feature instead (the mean activation of the busiest feature
of a seeded random top-k SAE, ``4 d_model`` features, k 16, on the last block's
``hook_resid_post``): the loop reads it with ``run_with_cache`` under ``ablate_neurons``,
the sweep is :func:`~bilinear_lens.sae.ablation.feature_ablation_sweep`; the compared
column is ``delta_feature``.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Callable

import torch

from bilinear_lens.activations.ablation import ablate_neurons, ablation_sweep, loss_metric
from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.model import BilinearTransformer, build_model

if TYPE_CHECKING:
    from bilinear_lens.weights.directions import FeatureDirection

# float32 model: the sweep does the loop's float ops, so only batch-size dependent matmul
# blocking could make them differ, far below this.
DISAGREE = 1e-5


def _best_time(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    result = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def _compare(
    model: BilinearTransformer, tokens: torch.Tensor, layer: int, repeats: int,
    read: Callable[[], float], sweep: Callable[[], torch.Tensor],
) -> tuple[float, float, float]:
    """(loop seconds, sweep seconds, max difference): the loop ablates each neuron of layer
    ``layer`` in turn and records ``read()`` minus its clean value; ``sweep()`` gives the
    same column batched."""
    d_mlp = model.cfg.d_mlp
    assert d_mlp is not None

    def loop() -> torch.Tensor:
        out = torch.empty(d_mlp, dtype=torch.float64)
        with torch.no_grad():
            clean = read()
            for neuron in range(d_mlp):
                with ablate_neurons(model, layer, [neuron]):
                    out[neuron] = read() - clean
        return out

    t_loop, loop_result = _best_time(loop, repeats)
    t_sweep, sweep_result = _best_time(sweep, repeats)
    return t_loop, t_sweep, float((loop_result - sweep_result).abs().max())


def _compare_loss(model: BilinearTransformer, tokens: torch.Tensor, layer: int, per_pass: int | None, repeats: int) -> tuple[float, float, float]:
    """:func:`_compare` on ``delta_loss``: :func:`ablation_sweep` vs the loop."""
    loss = loss_metric(tokens)
    return _compare(model, tokens, layer, repeats, lambda: float(loss(model(tokens))),
                    lambda: ablation_sweep(model, tokens, layer, ablations_per_pass=per_pass, progress=False)["delta_loss"])


def _feature(model: BilinearTransformer, tokens: torch.Tensor) -> "FeatureDirection":
    """The busiest feature of a seeded random top-k SAE on the last block's output."""
    from bilinear_lens.sae.config import SAEConfig
    from bilinear_lens.sae.model import SAE
    from bilinear_lens.weights.directions import FeatureDirection

    d = model.cfg.d_model
    sae = SAE(SAEConfig(d_in=d, d_sae=4 * d, hook_name=f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", k=16))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / d**0.5)
        _, cache = model.run_with_cache(tokens, names_filter=[sae.cfg.hook_name])
        busiest = int(sae.encode(cache[sae.cfg.hook_name]).mean((0, 1)).argmax())
    return FeatureDirection(sae, busiest)


def _compare_feature(model: BilinearTransformer, tokens: torch.Tensor, layer: int, per_pass: int | None, repeats: int) -> tuple[float, float, float]:
    """:func:`_compare` on ``delta_feature`` of :func:`_feature`: :func:`feature_ablation_sweep` vs the loop."""
    from bilinear_lens.sae.ablation import feature_ablation_sweep

    feature = _feature(model, tokens)
    hook = feature.sae.cfg.hook_name

    def read() -> float:
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        return float(feature.sae.encode(cache[hook])[..., feature.index].mean())

    return _compare(model, tokens, layer, repeats, read,
                    lambda: feature_ablation_sweep(model, tokens, layer, feature, ablations_per_pass=per_pass).columns["delta_feature"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-mlp", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=2)
    layers = parser.add_mutually_exclusive_group()
    layers.add_argument("--layer", type=int, default=0, help="the layer whose neurons are swept")
    layers.add_argument("--all-layers", action="store_true", help="sweep every layer in turn, one line each")
    parser.add_argument("--d-vocab", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pos", type=int, default=64)
    parser.add_argument("--ablations-per-pass", type=int, default=0, help="0: the library default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    parser.add_argument("--sae-feature", action="store_true", help="read an SAE feature (delta_feature) instead of the loss")
    args = parser.parse_args(argv)
    if not args.all_layers and not 0 <= args.layer < args.n_layers:
        parser.error(f"--layer {args.layer} is out of range [0, {args.n_layers}) for --n-layers {args.n_layers}")
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig(
        d_vocab=args.d_vocab, d_model=args.d_model, n_layers=args.n_layers, n_heads=4,
        d_mlp=args.d_mlp, n_ctx=args.pos, seed=0,
    )
    model = build_model(cfg).eval()
    tokens = torch.randint(0, cfg.d_vocab, (args.batch, args.pos), generator=torch.Generator().manual_seed(0))
    per_pass = args.ablations_per_pass or None

    print(
        f"d_model={cfg.d_model} d_mlp={cfg.d_mlp} n_layers={cfg.n_layers} d_vocab={cfg.d_vocab}; "
        f"tokens {args.batch} x {args.pos}; torch threads {torch.get_num_threads()}; "
        f"loop: 1 forward / neuron; sweep: batched; measure: {'SAE feature' if args.sae_feature else 'loss'}"
    )
    compare = _compare_feature if args.sae_feature else _compare_loss
    print(f"{'layer':>5}  {'loop s':>8}  {'sweep s':>8}  {'loop n/s':>9}  {'sweep n/s':>9}  {'loop/sweep':>10}  max|diff|")
    worst = 0.0
    for layer in range(cfg.n_layers) if args.all_layers else [args.layer]:
        t_loop, t_sweep, max_diff = compare(model, tokens, layer, per_pass, args.repeats)
        worst = max(worst, max_diff)
        print(
            f"{layer:>5}  {t_loop:8.3f}  {t_sweep:8.3f}  {cfg.d_mlp / t_loop:9.1f}  {cfg.d_mlp / t_sweep:9.1f}  "
            f"{t_loop / t_sweep:9.2f}x  {max_diff:.2e}"
        )
    if worst > DISAGREE:
        print(f"loop and sweep disagree: max difference {worst:.2e} > {DISAGREE:.0e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
