"""Are polytope regions purer than k-means clusters? (Black et al. 2022's prediction)

    python -m analysis.polytope_purity --checkpoint DIR --out analysis/out/polytope_purity

For each MLP layer of the checkpoint, streams text (``--text-file``, or synthetic stories)
through the model, packed as training and ``bilinear-lens polytope`` pack it
(:func:`bilinear_lens.data.packing.pack_documents`), and compares the word-class purity of the layer's polytope regions with
that of k-means clusters of its (unit-normalised) inputs with the same k, next to the
label-shuffled baselines and the size-weighted purity of clusters with >= ``--min-size``
tokens (:func:`bilinear_lens.activations.polytope.compare_purity`), and with k-means on the
sampled tokens' spline codes at the same k (:func:`bilinear_lens.activations.code_clusters.cluster_codes`:
unions of nearby regions, the partition that stays coarse at realistic width). Also profiles boundary density
along a few straight paths: between residual vectors of the text and between two tokens'
input embeddings. Writes ``purity.md``, ``boundary_density.png`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bilinear_lens.models.model import BilinearTransformer  # noqa: E402
from bilinear_lens.activations.code_clusters import cluster_codes  # noqa: E402
from bilinear_lens.activations.spline_codes import code_layout  # noqa: E402
from bilinear_lens.activations.polytope import (  # noqa: E402
    PathProfile,
    compare_purity,
    purity_report,
    embedding_path_profile,
    residual_path_profile,
    track_regions,
    word_class_labels,
)
from bilinear_lens.data.documents import split_text  # noqa: E402
from bilinear_lens.data.packing import PackedText, pack_documents  # noqa: E402
from bilinear_lens.data.synthetic import synthetic_stories  # noqa: E402


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", default="analysis/out/polytope_purity")
    parser.add_argument("--text-file", help="text to analyse (default: synthetic stories)")
    parser.add_argument("--layers", type=int, nargs="+", help="default: every layer")
    parser.add_argument("--max-tokens", type=int, default=20_000, help="text tokens run (BOS not counted)")
    parser.add_argument("--warmup", type=int, default=8,
                        help="positions not counted at the start of rows that start mid-document (as the polytope CLI)")
    parser.add_argument("--purity-tokens", type=int, default=2000, help="tokens sampled for k-means")
    parser.add_argument("--min-size", type=int, default=5)
    parser.add_argument("--n-paths", type=int, default=4)
    parser.add_argument("--n-steps", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _read_documents(args: argparse.Namespace) -> list[str]:
    """The documents under training's rule (``<|endoftext|>`` lines, else the whole file), as
    the polytope CLI reads a text file by default."""
    if args.text_file:
        return split_text(Path(args.text_file).read_text(encoding="utf-8"))  # training's document rule
    return synthetic_stories(2000, seed=f"polytope-purity-{args.seed}")


def pack_text(model: Any, documents: list[str], args: argparse.Namespace) -> PackedText:
    """The documents packed as training and the polytope CLI pack them (one rule,
    :func:`~bilinear_lens.data.packing.pack_documents`): BOS per document, no BOS per row,
    context-less row starts not counted."""
    return pack_documents(model.tokenizer, documents, model.cfg.n_ctx, args.max_tokens, args.warmup)


def _layer_purity(model: Any, packed: PackedText, layer: int, labels: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    tok = model.tokenizer
    special = sorted({i for i in (tok.bos_token_id, tok.pad_token_id) if i is not None})
    tracker, sample = track_regions(
        model,
        packed.rows.split(16),
        layer,
        masks=packed.mask.split(16),
        ignore_tokens=special,
        token_labels=labels,
        examples_per_region=0,
        sample_hook=f"blocks.{layer}.mlp.hook_in",
        sample_size=args.purity_tokens,
        seed=args.seed,
    )
    sample_labels = labels[sample.token_ids]
    comparison = compare_purity(sample.activations, sample.region_ids, sample_labels, min_size=args.min_size, seed=args.seed)
    labelled = sample_labels >= 0  # the tokens compare_purity clustered
    codes = cluster_codes(sample.codes[labelled], code_layout(model, layer).n_units, comparison.k, seed=args.seed)
    return {
        "layer": layer,
        "tokens": tracker.n_tokens,
        "distinct_regions": tracker.n_regions,
        "all_tokens": tracker.purity_report(args.min_size, seed=args.seed).as_dict(),
        "sample": {**comparison.as_dict(), "code_kmeans": purity_report(
            codes.assignment, sample_labels[labelled], args.min_size, seed=args.seed).as_dict()},
    }


def _paths(model: Any, blocks: torch.Tensor, layer: int, labels: np.ndarray, names: list[str], args: argparse.Namespace) -> dict[str, list[PathProfile]]:
    """Residual paths between random positions of the first block, and embedding paths
    between a positive and a negative word (or random tokens) at one position."""
    rng = np.random.default_rng(args.seed)
    prompt = blocks[0]
    resid = model.run_with_cache(prompt[None], names_filter=f"blocks.{layer}.hook_resid_mid")[1][f"blocks.{layer}.hook_resid_mid"][0]
    residual = []
    for _ in range(args.n_paths):
        i, j = rng.choice(np.arange(1, prompt.shape[0]), size=2, replace=False)
        residual.append(residual_path_profile(model, layer, resid[i], resid[j], args.n_steps))
    by_class = {name: np.flatnonzero(labels == k) for k, name in enumerate(names)}
    embedding = []
    for _ in range(args.n_paths):
        pos, neg = by_class.get("positive", []), by_class.get("negative", [])
        a, b = (rng.choice(pos), rng.choice(neg)) if len(pos) and len(neg) else rng.integers(0, model.cfg.d_vocab, 2)
        position = int(rng.integers(1, prompt.shape[0]))
        embedding.append(embedding_path_profile(model, prompt, position, int(a), int(b), layer, args.n_steps))
    return {"residual": residual, "embedding": embedding}


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _markdown(results: list[dict[str, Any]], kind: str, min_size: int) -> str:
    lines = [
        f"# Polytope regions vs k-means: word-class purity ({kind} MLP)",
        "",
        "Purity = sum over clusters of the majority-label count / labelled tokens. "
        f"Weighted: clusters with >= {min_size} tokens only ('covered' = their share of tokens). "
        "Shuffled: expected value with the labels dealt at random to the same cluster sizes. "
        "k-means runs on unit-normalised MLP inputs with k = the number of regions in the sample; "
        "k-means on codes clusters the same tokens' spline codes (Hamming distance) with the same k.",
        "",
        "| layer | partition | tokens | clusters | purity | shuffled | weighted | shuffled weighted | covered |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rows = [("regions (all tokens)", r["all_tokens"]), ("regions (sample)", r["sample"]["regions"]),
                ("k-means (sample)", r["sample"]["kmeans"]), ("k-means on codes (sample)", r["sample"]["code_kmeans"])]
        for name, p in rows:
            lines.append(
                f"| {r['layer']} | {name} | {p['n_tokens']} | {p['n_clusters']} | {_fmt(p['purity'])} | {_fmt(p['shuffled_purity'])} "
                f"| {_fmt(p['weighted_purity'])} | {_fmt(p['shuffled_weighted_purity'])} | {_fmt(p['covered_fraction'])} |"
            )
    lines += ["", f"Majority-class rate: {_fmt(results[0]['all_tokens']['majority_rate'])}.", ""]
    return "\n".join(lines)


def _plot(paths: dict[int, dict[str, list[PathProfile]]], out: Path) -> None:
    fig, axes = plt.subplots(len(paths), 2, figsize=(10, 3.2 * len(paths)), squeeze=False)
    for row, (layer, by_kind) in enumerate(paths.items()):
        for col, (kind, profiles) in enumerate(by_kind.items()):
            ax = axes[row, col]
            for p in profiles:
                ax.plot(p.distance, p.hamming_to_start, lw=1.2, label=f"{p.flips_per_unit_distance:.1f} flips/unit")
            ax.set(title=f"layer {layer}: {kind} paths", xlabel="distance along path", ylabel="Hamming to start")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    args = _parse(argv)
    model = BilinearTransformer.from_pretrained(args.checkpoint)
    if model.tokenizer is None:
        raise SystemExit(f"{args.checkpoint} has no tokenizer")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    packed = pack_text(model, _read_documents(args), args)
    labels, names = word_class_labels(model.tokenizer, model.cfg.d_vocab)
    layers = args.layers if args.layers is not None else list(range(model.cfg.n_layers))
    with torch.no_grad():
        results = [_layer_purity(model, packed, layer, labels, args) for layer in layers]
        paths = {layer: _paths(model, packed.rows, layer, labels, names, args) for layer in layers}
    (out / "purity.md").write_text(_markdown(results, model.cfg.mlp_kind, args.min_size), encoding="utf-8")
    _plot(paths, out / "boundary_density.png")
    summary = {
        "checkpoint": str(args.checkpoint),
        "label_names": names,
        "layers": results,
        "paths": {
            str(layer): {kind: [{"length": p.length, "n_flips": p.n_flips, "n_boundary_steps": p.n_boundary_steps} for p in ps] for kind, ps in by_kind.items()}
            for layer, by_kind in paths.items()
        },
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print((out / "purity.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'purity.md'}, {out / 'boundary_density.png'}, {out / 'results.json'}")


if __name__ == "__main__":
    main()
