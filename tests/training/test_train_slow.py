"""The full tiny recipe: validation loss far below the unigram entropy of the corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from bilinear_lens.training.config import load_run_config
from bilinear_lens.models.model import BilinearTransformer
from bilinear_lens.training.loop import train

TINY_RECIPE = Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.toml"


@pytest.mark.slow
def test_tiny_recipe_learns_the_synthetic_stories(tmp_path):
    cfg = load_run_config(TINY_RECIPE, [f'data.cache_dir="{tmp_path / "cache"}"'])
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.finished and result.steps == cfg.train.steps
    # Context-free prediction cannot beat the unigram entropy (~4.3 nats); the stories'
    # names, objects and sentiment are predictable from context, so the model must do far better.
    assert result.val_loss < 0.5 * result.unigram_entropy
    model = BilinearTransformer.from_pretrained(result.final_checkpoint)
    text = model.generate("Once upon a time", max_new_tokens=20, temperature=0)  # "<|endoftext|>Once upon..."
    continuation = text.split("Once upon a time", 1)[1]
    assert len(continuation.split()) >= 5
