"""The paper's image-classification readings (Pearce et al. 2024, §3) on 8x8 digits.

    python -m analysis.images --out analysis/out/images [--runs DIR]

Trains the shipped ``training/configs/digits-*.toml`` recipes (or resumes finished runs in
``--runs``) and writes into ``--out``:

- ``images.md``: held-out accuracy of bilinear vs ReLU (matched parameters) vs SwiGLU; top-k
  eigenvector accuracy of the bilinear models; adversarial-mask flip rates (eigenvector vs
  gradient vs random masks at equal L2 norm); spectrum concentration, effective rank and
  eigenvector total variation, pixel participation and neighbour
  correlation (of each class's top-4 eigenvectors) with and without input noise and for the overfit model;
- ``eigenvectors_<run>.png`` (top positive / negative eigenvector of each class),
  ``spectra.png`` (class-averaged |eigenvalue| spectra of the three bilinear runs);
- ``results.json`` (every number above).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import torch  # noqa: E402

from bilinear_lens.data.images import load_image_dataset  # noqa: E402
from bilinear_lens.models.image_classifier import load_image_classifier  # noqa: E402
from bilinear_lens.training.image_train import load_image_recipe, train_image_classifier  # noqa: E402
from bilinear_lens.views.image_plots import _new_figure, plot_eigen_grid  # noqa: E402
from bilinear_lens.weights.adversarial_masks import compare_attacks  # noqa: E402
from bilinear_lens.weights.image_eigen import class_eigendecomposition, eigen_summary, low_rank_accuracy  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
RUNS = ("digits-bilinear", "digits-relu", "digits-swiglu", "digits-bilinear-noise", "digits-overfit")
BILINEAR = ("digits-bilinear", "digits-bilinear-noise", "digits-overfit")
KS = (1, 2, 4, 8, 64)
EPSILONS = (0.5, 1.0, 2.0)


def train_all(runs_dir: Path) -> dict:
    models = {}
    for name in RUNS:
        recipe = load_image_recipe(CONFIGS / f"{name}.toml")
        out = runs_dir / name
        result = train_image_classifier(recipe, out, resume=(out / "checkpoints").is_dir(), progress=False)
        models[name] = (load_image_classifier(result.final).eval(), recipe)
    return models


def analyse(runs_dir: Path, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    models = train_all(runs_dir)
    data = load_image_dataset("digits")
    x, y = data.test_x, data.test_y
    results: dict = {"accuracy": {}, "train_accuracy": {}, "params": {}, "low_rank": {}, "adversarial": {}, "spectra": {}}
    spectra_fig = _new_figure((6, 3.2))
    ax = spectra_fig.add_subplot()
    for name, (model, recipe) in models.items():
        train_x, train_y = recipe.data.load().train_x, recipe.data.load().train_y
        results["accuracy"][name] = model.accuracy(x, y)
        results["train_accuracy"][name] = model.accuracy(train_x, train_y)
        results["params"][name] = sum(p.numel() for p in model.parameters())
        if name not in BILINEAR:
            continue
        eig = class_eigendecomposition(model.double())
        results["low_rank"][name] = low_rank_accuracy(model, x.double(), y, KS, eig)
        results["adversarial"][name] = compare_attacks(model, x.double(), y, EPSILONS)
        results["spectra"][name] = eigen_summary(eig, k=4)
        plot_eigen_grid(eig).savefig(out_dir / f"eigenvectors_{name}.png", dpi=110)
        mags = eig.eigenvalues.abs().sort(-1, descending=True).values
        mags = mags / mags[:, :1]
        ax.semilogy(mags.mean(0).numpy(), marker=".", label=name)
    ax.set_xlabel("eigenvalue rank")
    ax.set_ylabel("|λ| / |λ_1| (class mean)")
    ax.legend(fontsize=7)
    spectra_fig.savefig(out_dir / "spectra.png", dpi=110)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "images.md").write_text(markdown(results))
    return results


def markdown(r: dict) -> str:
    lines = ["# Image classifiers on 8x8 digits (359 held-out images)", "",
             "| run | params | train acc | held-out acc |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['params'][n]} | {r['train_accuracy'][n]:.4f} | {a:.4f} |" for n, a in r["accuracy"].items()]
    lines += ["", "## top-k eigenvectors per class (held-out accuracy)", "",
              "| run | " + " | ".join(f"k={k}" for k in KS) + " |", "|---|" + "---|" * len(KS)]
    lines += [f"| {n} | " + " | ".join(f"{acc[k]:.4f}" for k in KS) + " |" for n, acc in r["low_rank"].items()]
    lines += ["", "## adversarial masks: flip rate of correctly classified held-out images", "",
              "| run | L2 norm | eigenvector mask | gradient (FGM) | random |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {row['eps']} | {row['eigen']:.3f} | {row['gradient']:.3f} | {row['random']:.3f} |"
              for n, rows in r["adversarial"].items() for row in rows]
    lines += ["", "## spectra (class means)", "",
              "| run | concentration@4 | effective rank | top |λ| | total variation | pixel participation | "
              "neighbour correlation |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {s['concentration@4']:.3f} | {s['effective_rank']:.2f} | {s['top_eigenvalue']:.3f} | "
              f"{s['total_variation']:.2f} | {s['pixel_participation']:.3f} | {s['neighbour_correlation']:.3f} |" for n, s in r["spectra"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="analysis/out/images")
    parser.add_argument("--runs", default=None, help="run directories (default: OUT/runs)")
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    analyse(Path(args.runs) if args.runs else out / "runs", out)
    print((out / "images.md").read_text())


if __name__ == "__main__":
    main()
