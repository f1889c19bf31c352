"""Image-classifier fixtures: a tiny float64 model with random weights (:func:`small_float64_model`,
for exactness tests) and a bilinear digits classifier trained once per test session (seeded,
~1 s on 1 thread)."""

from __future__ import annotations

import functools

import torch

from bilinear_lens.data.images import load_image_dataset
from bilinear_lens.models.image_classifier import ImageClassifier, ImageClassifierConfig
from bilinear_lens.training.image_train import ImageTraining, load_image_recipe


def small_float64_model(n_classes: int, **overrides) -> ImageClassifier:
    """A 4 x 5-pixel classifier (d_embed 6, d_mlp 7, seed 0) in float64, in eval mode."""
    base = dict(image_shape=(4, 5), n_classes=n_classes, d_embed=6, d_mlp=7, seed=0, init_range=0.3)
    base.update(overrides)
    return ImageClassifier(ImageClassifierConfig(**base)).double().eval()


@functools.lru_cache(maxsize=None)
def digits():
    return load_image_dataset("digits", seed=0)


@functools.lru_cache(maxsize=None)
def trained_digits_model(mlp_kind: str = "bilinear", steps: int = 150, input_noise: float = 0.0) -> ImageClassifier:
    """Trained by the recipe's task in a plain loop (no run directory: the loop itself is
    tested in test_images_train.py)."""
    recipe = load_image_recipe(None, [f"model.mlp_kind={mlp_kind}", "model.d_mlp=32", f"train.steps={steps}",
                                      f"data.input_noise={input_noise}"])
    model = ImageClassifier(recipe.model)
    task = ImageTraining(model, digits(), recipe, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.train.lr, weight_decay=recipe.train.weight_decay)
    torch.manual_seed(0)
    for step in range(steps):
        loss = task.loss(model, task.batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
