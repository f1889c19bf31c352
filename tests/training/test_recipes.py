"""The shipped training recipes load and validate, and say what their comments claim."""

from __future__ import annotations

from pathlib import Path

import pytest

from bilinear_lens.sae.recipe import load_sae_recipe
from bilinear_lens.training.config import load_run_config
from bilinear_lens.training.image_train import load_image_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_every_recipe_validates(recipe: str) -> None:
    # raises naming the key, section and file on a bad value; sae-* recipes have an [sae] table,
    # digits-* recipes are image classifiers (training/image_train.py)
    loader = load_sae_recipe if recipe.startswith("sae-") else load_image_recipe if recipe.startswith("digits-") else load_run_config
    loader(CONFIGS / recipe)


def test_there_are_recipes_to_check() -> None:
    assert {"tiny.toml", "tinystories-1l.toml", "tinystories-6l.toml", "tinystories-1l-cpu.toml"} <= {p.name for p in CONFIGS.glob("*.toml")}


def test_paper_recipe_matches_table_2() -> None:
    # Pearce et al. 2024, Table 2 (TinyStories): 6 layers, d_model 512, d_mlp 2048, 8 heads,
    # context 256, vocabulary 4096, batch 512, AdamW (0.9, 0.95), lr 1e-3, wd 0.1, 5 epochs
    cfg = load_run_config(CONFIGS / "tinystories-6l.toml")
    m, d, t = cfg.model, cfg.data, cfg.train
    assert (m.n_layers, m.d_model, m.d_mlp, m.n_heads, m.n_ctx, m.mlp_kind) == (6, 512, 2048, 8, 256, "bilinear")
    assert d.vocab_size == 4096 and d.source == "roneneldan/TinyStories"
    assert (t.batch_size, t.beta1, t.beta2, t.lr, t.weight_decay, t.epochs) == (512, 0.9, 0.95, 1e-3, 0.1, 5)


def test_cpu_benchmark_recipe_has_the_atlas_benchmark_dims() -> None:
    # benchmarks/eigen.py measures the atlas on this model: the d 512 / d_mlp 2048 /
    # vocabulary 4096, about 5 epochs of the ~190k-token sample (240 x 32 x 128 = 983k tokens)
    cfg = load_run_config(CONFIGS / "tinystories-1l-cpu.toml")
    assert (cfg.model.d_model, cfg.model.d_mlp, cfg.data.vocab_size, cfg.model.n_layers) == (512, 2048, 4096, 1)
    assert cfg.train.steps * cfg.train.batch_size * cfg.model.n_ctx == 983_040
    assert cfg.train.device == "cpu" and cfg.train.autocast == "none"
