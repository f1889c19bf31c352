"""Are output SAE features low rank in the input? (Pearce et al. 2024, §5, with SAEs)

    python -m analysis.sae_low_rank --out analysis/out/sae_low_rank

Trains (or reuses, from ``--out``) the ``tiny`` model on real text (the TinyStories sample
``../shared/data/tinystories/validation_sample.txt`` where present, else the synthetic
corpus) and, per layer, a top-k SAE on ``blocks.{l}.hook_resid_post`` (output side;
``training/configs/sae-tiny.toml``). For every *live* output feature ``i`` (it fires on at
least one held-out token), ``u_i`` is its encoder column, so ``u_i . MLP(x)`` is the MLP's
exact contribution to the feature's pre-activation; on the held-out tokens the script
correlates it with the top-k eigen-approximation ``sum_{j<k} lambda_j (v_j . x)^2`` of
``Q(u_i)`` (k = 1, 2, 4; ``x`` the MLP input through hooks), and does the same for the
``--n-tokens`` most frequent output tokens (unembedding directions). It reports the
fraction above 0.75 next to the paper's figure (69% of output features above 0.75 at k=2)
and draws one histogram. Writes ``results.md``, ``results.json``, ``sae_low_rank.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bilinear_lens.activations.eigen_readings import mlp_inputs  # noqa: E402
from bilinear_lens.data.corpus import prepare_data  # noqa: E402
from bilinear_lens.models.model import BilinearTransformer  # noqa: E402
from bilinear_lens.sae.model import load_sae  # noqa: E402
from bilinear_lens.sae.recipe import load_sae_recipe  # noqa: E402
from bilinear_lens.sae.train import train_sae  # noqa: E402
from bilinear_lens.training.config import load_run_config  # noqa: E402
from bilinear_lens.training.loop import train  # noqa: E402
from bilinear_lens.weights.directions import FeatureDirection, sae_feature_direction, token_directions  # noqa: E402
from bilinear_lens.weights.eigen import eigendecompose_directions, low_rank_correlation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "tinystories" / "validation_sample.txt"
KS = (1, 2, 4)
THRESHOLD = 0.75
PAPER_FRACTION_K2 = 0.69


def _overrides(source: str, cache_dir: Path) -> list[str]:
    return [f"data.source={json.dumps(source)}", f"data.cache_dir={json.dumps(str(cache_dir))}"]


def prepare_model_and_saes(out: Path, source: str, progress: bool, sae_overrides: list[str]) -> tuple[Path, list[Path]]:
    """The tiny model trained on ``source`` and one output SAE per layer (reused when present;
    ``sae_overrides`` change the SAE recipe and name the SAE directories)."""
    cache = out / "data_cache"
    model_dir = out / "model" / "final"
    if not model_dir.is_dir():
        run_config = load_run_config(ROOT / "training/configs/tiny.toml", _overrides(source, cache))
        train(run_config, out / "model", progress=progress)
    saes = []
    for layer in range(BilinearTransformer.from_pretrained(model_dir).cfg.n_layers):
        tag = "".join(f"_{o.split('.', 1)[-1].replace('=', '')}" for o in sae_overrides)
        sae_dir = out / f"sae_l{layer}_out{tag}"
        if not (sae_dir / "final").is_dir():
            recipe = load_sae_recipe(ROOT / "training/configs/sae-tiny.toml",
                                     _overrides(source, cache) + [f"sae.hook=blocks.{layer}.hook_resid_post", *sae_overrides])
            train_sae(model_dir, sae_dir, recipe, progress=progress)
        saes.append(sae_dir)
    return model_dir, saes


def held_out_tokens(model_dir: Path, source: str, cache: Path, max_tokens: int) -> torch.Tensor:
    """``[rows, n_ctx]`` from the validation split of the recipe's token cache (never trained on)."""
    n_ctx = BilinearTransformer.from_pretrained(model_dir).cfg.n_ctx
    dc = load_run_config(ROOT / "training/configs/tiny.toml", _overrides(source, cache)).data
    _, _, val = prepare_data(dc.source, tokenizer=model_dir / "tokenizer.json", n_ctx=n_ctx, cache_dir=dc.cache_dir,
                             max_docs=dc.max_docs or None, val_fraction=dc.val_fraction, seed=dc.seed)
    n = max(1, min(len(val), max_tokens // n_ctx))
    return torch.stack([val[i][:-1] for i in range(n)])


@torch.no_grad()
def correlations(model: Any, layer: int, U: torch.Tensor, x: torch.Tensor) -> dict[int, list[float]]:
    """Per direction (rows of ``U``): corr(u . MLP(x), top-k eigen-approximation) for k in KS."""
    mlp = model.blocks[layer].mlp
    eig = eigendecompose_directions(mlp, U.to(mlp.W_in.dtype), k=max(KS))
    out: dict[int, list[float]] = {k: [] for k in KS}
    for n in range(U.shape[0]):
        one = type(eig)(eig.eigenvalues[n], eig.eigenvectors[n])
        for k, c in zip(KS, low_rank_correlation(mlp, U[n], x, list(KS), eig=one).tolist()):
            out[k].append(c)
    return out


@torch.no_grad()
def analyse(model: Any, sae_dirs: list[Path], tokens: torch.Tensor, n_tokens: int) -> dict[str, Any]:
    counts = torch.bincount(tokens.flatten(), minlength=model.cfg.d_vocab)
    U_tok = token_directions(model, counts.argsort(descending=True)[:n_tokens].tolist())
    layers = []
    for layer, sae_dir in enumerate(sae_dirs):
        sae = load_sae(sae_dir, model=model)
        live = (sae.feature_acts(model, tokens) > 0).flatten(0, 1).any(0).nonzero().flatten().tolist()
        U_feat = torch.stack([sae_feature_direction(model, FeatureDirection(sae, i, "encoder")) for i in live])
        x = mlp_inputs(model, tokens, layer).reshape(-1, model.cfg.d_model)
        layers.append({"layer": layer, "n_features": sae.cfg.d_sae, "n_live": len(live),
                       "features": correlations(model, layer, U_feat, x), "tokens": correlations(model, layer, U_tok, x)})
    return {"n_held_out_tokens": int(tokens.numel()), "n_output_tokens": int(U_tok.shape[0]), "layers": layers}


def _frac(values: list[float]) -> float:
    return float(np.mean(np.asarray(values) > THRESHOLD))


def markdown(results: dict[str, Any], source: str) -> str:
    lines = [f"# Output SAE features vs tokens: low rank on real inputs ({Path(source).name})", "",
             f"Fraction of directions whose top-k eigen-approximation correlates > {THRESHOLD} with the true "
             f"u . MLP(x) over {results['n_held_out_tokens']} held-out tokens (paper, output features, k=2: "
             f"{PAPER_FRACTION_K2:.0%}).", "",
             "| layer | directions | n | k=1 | k=2 | k=4 | median corr k=2 |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results["layers"]:
        for name, n in (("features", r["n_live"]), ("tokens", results["n_output_tokens"])):
            c = r[name]
            lines.append(f"| {r['layer']} | {'live SAE features' if name == 'features' else 'frequent tokens'} | {n} | "
                         + " | ".join(f"{_frac(c[k]):.0%}" for k in KS) + f" | {np.median(c[2]):.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results["layers"]), figsize=(5 * len(results["layers"]), 3.6), squeeze=False)
    bins = np.linspace(-0.2, 1, 25)
    for ax, r in zip(axes[0], results["layers"]):
        ax.hist(r["features"][2], bins=bins, alpha=0.6, density=True, label=f"SAE features ({r['n_live']})")
        ax.hist(r["tokens"][2], bins=bins, alpha=0.6, density=True, label=f"tokens ({results['n_output_tokens']})")
        ax.axvline(THRESHOLD, color="k", ls="--", lw=1)
        ax.set(title=f"layer {r['layer']}: top-2 eigen-approximation", xlabel="correlation with u . MLP(x)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "analysis/out/sae_low_rank")
    p.add_argument("--source", default=str(SAMPLE) if SAMPLE.is_file() else "synthetic",
                   help="corpus (default: the TinyStories sample where present, else synthetic)")
    p.add_argument("--n-tokens", type=int, default=100, help="most frequent output tokens to compare")
    p.add_argument("--max-tokens", type=int, default=16384, help="held-out tokens")
    p.add_argument("--sae-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="SAE recipe override, e.g. --sae-set sae.k=8 (results go to results_<override>.*)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    model_dir, sae_dirs = prepare_model_and_saes(args.out, args.source, not args.no_progress, args.sae_set)
    model = BilinearTransformer.from_pretrained(model_dir).eval()
    tokens = held_out_tokens(model_dir, args.source, args.out / "data_cache", args.max_tokens)
    results = analyse(model, sae_dirs, tokens, args.n_tokens)
    table = markdown(results, args.source)
    stem = sae_dirs[0].name.removeprefix("sae_l0_out").replace("_", "", 1)
    suffix = f"_{stem}" if stem else ""
    (args.out / f"results{suffix}.md").write_text(table)
    (args.out / f"results{suffix}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / f"sae_low_rank{suffix}.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
