"""Privileged basis in toy models of superposition: linear vs ReLU vs bilinear hidden layers.

For each hidden-layer kind and sparsity, trains one :class:`~bilinear_lens.toy.ToyModel`
with ``--instances`` independently initialised instances (our seeds) and reports, mean ±
std over instances:

- alignment ``h(e_i)``: :func:`~bilinear_lens.toy.model_alignment_score`, how much of a
  lone feature's hidden activation sits on one neuron (1 = own neuron, 1/m = spread);
- the same score for the untrained init (a ReLU alone zeroes about half of a random
  column, so the init is the baseline to beat, not 1/m);
- alignment of the encoder weights ``W`` (``W1`` for bilinear), before any nonlinearity;
- rotation residual: :func:`~bilinear_lens.toy.rotation_invariance` for one random
  rotation (max over instances; ~1e-16 means the hidden basis is not privileged);
- the final loss on a held-out batch.

Writes ``toy_privileged_basis.md`` (the table, also printed) and
``toy_privileged_basis.png`` (feature embeddings and their Gram matrices) to ``--out``.

    python -m analysis.toy_privileged_basis --out analysis/out/toy_privileged_basis
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from bilinear_lens.toy import (  # noqa: E402
    TOY_KINDS,
    ToyConfig,
    ToyModel,
    alignment_score,
    evaluate_loss,
    model_alignment_score,
    random_rotation,
    rotation_invariance,
    train_toy_model,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "toy_privileged_basis"
DEFAULT_SPARSITIES = (0.9, 0.99)


@dataclass
class Row:
    """One (kind, sparsity) cell of the table; tensors are per instance."""

    kind: str
    sparsity: float
    alignment: Tensor
    alignment_init: Tensor
    alignment_weights: Tensor
    rotation_residual: float
    loss: Tensor
    seconds: float


def _mean_std(values: Tensor, digits: int = 3) -> str:
    return f"{values.mean().item():.{digits}f} ± {values.std().item():.{digits}f}"


def measure(model: ToyModel, seconds: float, seed: int) -> Row:
    """All table columns for one trained model."""
    cfg = model.cfg
    with torch.no_grad():
        weights_alignment = alignment_score(model.W)
    return Row(
        kind=cfg.kind,
        sparsity=cfg.sparsity,
        alignment=model_alignment_score(model),
        alignment_init=model_alignment_score(ToyModel(cfg, seed=seed)),
        alignment_weights=weights_alignment,
        rotation_residual=rotation_invariance(model, random_rotation(cfg.n_hidden, seed=seed)),
        loss=evaluate_loss(model),
        seconds=seconds,
    )


def markdown_table(rows: list[Row]) -> str:
    """The results as a markdown table (mean ± std over instances)."""
    header = (
        "| kind | sparsity | alignment h(e_i) | alignment at init | alignment of W "
        "| rotation residual | final loss |\n|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r.kind} | {r.sparsity:g} | {_mean_std(r.alignment)} | {_mean_std(r.alignment_init)} "
        f"| {_mean_std(r.alignment_weights)} | {r.rotation_residual:.1e} | {_mean_std(r.loss, 4)} |"
        for r in rows
    ]
    return header + "\n".join(lines) + "\n"


def plot_embeddings(models: dict[str, ToyModel], path: Path) -> None:
    """Per kind (columns): instance 0's feature embeddings ``h(e_i)`` (neurons x features,
    top) and their Gram matrix ``E^T E`` (features x features, bottom)."""
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.5), squeeze=False)
    for col, (kind, model) in enumerate(models.items()):
        with torch.no_grad():
            E = model.feature_embeddings()[0]
        E = E / E.abs().max()  # bilinear embeddings live on another scale
        gram = E.T @ E
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(E.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        top.set(title=f"{kind}: h(e_i), S={model.cfg.sparsity:g}", xlabel="feature i", ylabel="neuron")
        bound = gram.abs().max().item()
        bottom.imshow(gram.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
        bottom.set(title=f"{kind}: E^T E", xlabel="feature", ylabel="feature")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(
    out: Path, sparsities: tuple[float, ...], instances: int, steps: int, seed: int
) -> list[Row]:
    """Train every (kind, sparsity), write the table and figure to ``out``, return rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    sparsest: dict[str, ToyModel] = {}
    for sparsity in sparsities:
        for kind in TOY_KINDS:
            cfg = ToyConfig(kind=kind, sparsity=sparsity, n_instances=instances)
            start = time.perf_counter()
            model = train_toy_model(cfg, steps=steps, seed=seed)
            rows.append(measure(model, time.perf_counter() - start, seed))
            if sparsity == max(sparsities):
                sparsest[kind] = model
    cfg = ToyConfig()
    notes = (
        f"n_features={cfg.n_features}, n_hidden={cfg.n_hidden}, importance={cfg.importance_decay}**i, "
        f"{instances} instances (seeds) per row, {steps} Adam steps, batch 1024, lr 1e-2, seed {seed}. "
        "Alignment: mean over represented features (norm >= 0.5 x max) of max_h E[h,i]^2 / sum_h E[h,i]^2, "
        "range [1/m, 1] = [0.2, 1]. 'alignment of W' uses W1 for bilinear.\n"
    )
    table = markdown_table(rows)
    (out / "toy_privileged_basis.md").write_text("# Privileged basis in toy models\n\n" + notes + "\n" + table)
    plot_embeddings(sparsest, out / "toy_privileged_basis.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    parser.add_argument("--instances", type=int, default=8, help="independent seeds per row")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = run(args.out, tuple(args.sparsities), args.instances, args.steps, args.seed)
    print(markdown_table(rows))
    print(f"wrote {args.out}/toy_privileged_basis.md and .png in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
