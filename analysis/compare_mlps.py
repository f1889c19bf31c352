"""Validation loss of the bilinear MLP against ReLU, GELU, SwiGLU and linear MLPs.

Same corpus, tokenizer, data order, seed, number of steps and MLP parameter count
(:meth:`ModelConfig.with_matched_params`: gated kinds have 3 ``d_model x d_mlp`` matrices,
plain kinds 2, so plain kinds get 1.5x the ``d_mlp``); everything else comes from a
training recipe (default: ``training/configs/tiny.toml``). Writes ``results.md`` (a
markdown table, also printed) and ``results.json`` to ``--out``, and each run's directory
under ``--out/runs/<kind>``.

    python -m analysis.compare_mlps --out analysis/out/compare_mlps
    python -m analysis.compare_mlps --out analysis/out/compare_mlps_ts --source path/to/stories.txt --steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from bilinear_lens.training.config import load_run_config
from bilinear_lens.models.model import BilinearTransformer
from bilinear_lens.training.loop import train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = REPO / "training" / "configs" / "tiny.toml"
KINDS = ("bilinear", "relu", "gelu", "swiglu", "linear")


def compare(
    recipe: Path, out: Path, kinds: tuple[str, ...] = KINDS, steps: Optional[int] = None,
    source: Optional[str] = None, cache_dir: Optional[str] = None, progress: bool = True,
) -> list[dict[str, Any]]:
    """Train one model per MLP kind (MLP parameters matched to the recipe's kind); return
    one row per kind: kind, d_mlp, MLP and total parameters, final validation loss."""
    overrides = ["train.eval_batches=0"]  # the final loss over the whole validation split
    if steps is not None:
        overrides += [f"train.steps={steps}", "train.epochs=0"]
    if source is not None:
        overrides.append(f"data.source={json.dumps(source)}")
    if cache_dir is not None:
        overrides.append(f"data.cache_dir={json.dumps(cache_dir)}")
    base = load_run_config(recipe, overrides)
    rows = []
    for kind in kinds:
        cfg = dataclasses.replace(base, model=base.model.with_matched_params(kind))
        run_dir = out / "runs" / kind
        shutil.rmtree(run_dir, ignore_errors=True)  # a comparison always starts fresh
        start = time.perf_counter()
        result = train(cfg, run_dir, progress=progress)
        seconds = time.perf_counter() - start
        model = BilinearTransformer.from_pretrained(result.final_checkpoint)
        rows.append({
            "kind": kind, "d_mlp": model.cfg.d_mlp, "mlp_params": model.cfg.mlp_params_per_layer() * model.cfg.n_layers,
            "params": sum(p.numel() for p in model.parameters()), "steps": result.steps,
            "val_loss": result.val_loss, "unigram_entropy": result.unigram_entropy, "seconds": round(seconds, 1),
        })
        print(f"{kind}: val loss {result.val_loss:.4f} ({seconds:.0f} s)", flush=True)
    return rows


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"### {title}", "", "| MLP | d_mlp | MLP params | total params | steps | val loss (nats) | vs bilinear |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    ref = next((r["val_loss"] for r in rows if r["kind"] == "bilinear"), None)
    for r in rows:
        delta = f"{r['val_loss'] - ref:+.4f}" if ref is not None else "-"
        lines.append(f"| {r['kind']} | {r['d_mlp']} | {r['mlp_params']:,} | {r['params']:,} | {r['steps']} | "
                     f"{r['val_loss']:.4f} | {delta} |")
    lines += ["", f"Unigram entropy of the validation tokens: {rows[0]['unigram_entropy']:.3f} nats "
              "(the best loss without context)."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--config", type=Path, default=DEFAULT_RECIPE, help="training recipe (default: tiny)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--source", default=None, help="corpus: 'synthetic' or a text file (default: the recipe's)")
    parser.add_argument("--cache-dir", default=None, help="token cache directory (default: the recipe's)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    rows = compare(args.config, args.out, tuple(args.kinds), args.steps, args.source, args.cache_dir,
                   progress=not args.no_progress)
    source = args.source or load_run_config(args.config).data.source
    title = f"MLP kinds at matched MLP parameters: {args.config.name}, source {Path(source).name}, {rows[0]['steps']} steps"
    table = markdown_table(rows, title)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(table)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
