"""How low-rank are a bilinear model's interaction matrices? (weights and activations)

    python -m analysis.eigen_spectra --checkpoint DIR --out analysis/out/eigen_spectra

For every bilinear layer and the ``--n-tokens`` most frequent output tokens of the sample
text, eigendecompose ``Q(u_t)`` (``u_t``: the token's unembedding through the final norm,
direct path) and report how much the top-k eigenvectors explain:

- **weights**: the fraction of ``||Q||_F^2`` held by the top k eigenvalues,
  ``sum_{i<k} lambda_i^2 / sum_i lambda_i^2``;
- **activations**: the Pearson correlation, over the sample's tokens, between the layer's
  true ``u_t . MLP(x)`` and the rank-k ``sum_{i<k} lambda_i (v_i . x)^2`` (the paper's
  Figure 9 measure), with ``x`` the MLP input cached through hooks.

Pearce et al. (2024) report that a few eigenvectors capture most of an output feature on
real inputs even when the spectrum's Frobenius mass is spread out. Writes
``eigen_spectra.md``, ``eigen_spectra.png`` and ``results.json``.
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

from bilinear_lens.weights.directions import token_directions  # noqa: E402
from bilinear_lens.weights.eigen import eigendecompose_directions, low_rank_correlation  # noqa: E402
from bilinear_lens.activations.eigen_readings import mlp_inputs  # noqa: E402
from bilinear_lens.models.model import BilinearTransformer  # noqa: E402
from bilinear_lens.data.synthetic import synthetic_stories  # noqa: E402

KS = (1, 2, 4, 8, 16)


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="analysis/out/eigen_spectra")
    p.add_argument("--text-file", help="sample text (default: synthetic stories)")
    p.add_argument("--n-tokens", type=int, default=100, help="output tokens to analyse (most frequent first)")
    p.add_argument("--max-tokens", type=int, default=8192, help="sample tokens for the activation measure")
    return p.parse_args(argv)


def _sample(model: Any, args: argparse.Namespace) -> torch.Tensor:
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else "\n".join(synthetic_stories(600, seed=11))
    ids = model.tokenizer.encode(text, add_special_tokens=False)[: args.max_tokens]
    n_ctx = model.cfg.n_ctx
    n_rows = max(1, len(ids) // n_ctx)
    return torch.tensor(ids[: n_rows * n_ctx]).reshape(n_rows, n_ctx)


@torch.no_grad()
def analyse(model: Any, tokens: torch.Tensor, n_tokens: int) -> dict[str, Any]:
    counts = torch.bincount(tokens.flatten(), minlength=model.cfg.d_vocab)
    out_ids = counts.argsort(descending=True)[:n_tokens].tolist()
    U = token_directions(model, out_ids)
    layers = []
    for layer in range(model.cfg.n_layers):
        mlp = model.blocks[layer].mlp
        eig = eigendecompose_directions(mlp, U.to(mlp.W_in.dtype))
        squares = eig.eigenvalues**2
        explained = {k: (squares[:, :k].sum(-1) / squares.sum(-1)).tolist() for k in KS if k <= eig.k}
        x = mlp_inputs(model, tokens, layer).reshape(-1, model.cfg.d_model)
        corr = {k: [] for k in explained}
        for n in range(len(out_ids)):
            one = type(eig)(eig.eigenvalues[n], eig.eigenvectors[n])
            values = low_rank_correlation(mlp, U[n], x, list(explained), eig=one)
            for k, v in zip(explained, values.tolist()):
                corr[k].append(v)
        layers.append(
            {
                "layer": layer,
                "tokens": [model.tokenizer.decode([i]) for i in out_ids],
                "weights_explained": explained,
                "activation_correlation": corr,
                "spectra": eig.eigenvalues[:6].tolist(),
            }
        )
    return {"n_output_tokens": len(out_ids), "n_sample_tokens": int(tokens.numel()), "layers": layers}


def _q(values: list[float]) -> str:
    a = np.asarray(values)
    return f"{np.median(a):.3f} [{np.quantile(a, 0.25):.3f}, {np.quantile(a, 0.75):.3f}]"


def markdown(results: dict[str, Any], checkpoint: str) -> str:
    lines = [
        f"# Low-rank structure of Q(u) for output tokens ({checkpoint})",
        "",
        f"{results['n_output_tokens']} most frequent output tokens; activation measure over "
        f"{results['n_sample_tokens']} sample tokens. Cells: median [25%, 75%] over output tokens.",
        "",
        "| layer | k | weights: share of ‖Q‖²_F | activations: corr(u·MLP(x), rank-k) |",
        "|---|---|---|---|",
    ]
    for r in results["layers"]:
        for k in r["weights_explained"]:
            lines.append(f"| {r['layer']} | {k} | {_q(r['weights_explained'][k])} | {_q(r['activation_correlation'][k])} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results["layers"]:
        ks = [int(k) for k in r["weights_explained"]]
        axes[0].plot(ks, [np.median(v) for v in r["weights_explained"].values()], "o-", label=f"layer {r['layer']}")
        axes[1].plot(ks, [np.median(v) for v in r["activation_correlation"].values()], "o-", label=f"layer {r['layer']}")
    axes[0].set(xscale="log", xlabel="k", ylabel="median share of ||Q||_F^2", title="weights")
    axes[1].set(xscale="log", xlabel="k", ylabel="median correlation", title="activations", ylim=(0, 1.02))
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    model = BilinearTransformer.from_pretrained(args.checkpoint)
    if model.cfg.mlp_kind != "bilinear":
        raise SystemExit(f"{args.checkpoint} has {model.cfg.mlp_kind!r} MLPs; this analysis needs a bilinear model")
    if model.tokenizer is None:
        raise SystemExit(f"{args.checkpoint} has no tokenizer.json")
    results = analyse(model, _sample(model, args), args.n_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results, args.checkpoint)
    (out / "eigen_spectra.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "eigen_spectra.png")
    print(table)
    print(f"wrote {out}/eigen_spectra.md, eigen_spectra.png, results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
