"""Adversarial masks from the weights: the closed-form gain is exact, the masks have the
stated norm, and on a trained digits classifier they flip predictions (far more than random
masks of the same norm)."""

from __future__ import annotations

import pytest
import torch

from bilinear_lens.models.image_classifier import ImageClassifier
from bilinear_lens.weights.adversarial_masks import (
    compare_attacks,
    eigen_masks,
    flip_rate,
    gradient_masks,
    pair_eigen,
    random_masks,
)
from bilinear_lens.weights.image_eigen import pixel_interaction_matrices
from images_fixtures import digits, small_float64_model, trained_digits_model

# float64: the closed form and the forward differ by rounding only (measured <= 1e-15 on
# logits ~1); 1e-10 leaves a wide margin.
FLOAT64 = dict(rtol=1e-10, atol=1e-10)


def model64(**overrides) -> ImageClassifier:
    return small_float64_model(4, **overrides)


def pixels(n: int = 8) -> torch.Tensor:
    return torch.rand(n, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("residual", [False, True])
def test_eigen_mask_changes_the_logit_difference_by_the_closed_form(residual):
    model = model64(residual=residual)
    x = pixels()
    y = model(x).argmax(-1)
    eps = 0.7
    pairs = pair_eigen(model)
    delta, target = eigen_masks(model, x, y, eps, pairs)
    before, after = model(x), model(x + delta)
    n = torch.arange(len(x))
    change = (after[n, target] - after[n, y]) - (before[n, target] - before[n, y])
    lam, v = pairs.values[y, target], pairs.vectors[y, target]
    expected = lam * (2 * eps * (v * x).sum(-1).abs() + eps**2)
    if residual:  # plus the linear path through W_E (u_t - u_y)
        U = model.W_U.T
        expected = expected + ((delta @ model.W_E) * (U[target] - U[y])).sum(-1)
    torch.testing.assert_close(change, expected, **FLOAT64)
    assert bool((target != y).all())


def test_pair_eigen_is_the_top_eigenpair_of_the_difference_matrix():
    model = model64()
    pairs = pair_eigen(model)
    Q = pixel_interaction_matrices(model)
    D = Q[2] - Q[0]
    v = pairs.vectors[0, 2]
    torch.testing.assert_close(D @ v, pairs.values[0, 2] * v, **FLOAT64)
    assert float(pairs.values[0, 2]) == pytest.approx(float(torch.linalg.eigvalsh(D).max()), rel=1e-12)
    assert float(pairs.values[1, 1]) == 0.0


def test_every_mask_has_the_stated_norm():
    model = model64()
    x = pixels()
    y = model(x).argmax(-1)
    for delta in (eigen_masks(model, x, y, 1.5)[0], gradient_masks(model, x, y, 1.5), random_masks(model, x, 1.5)):
        torch.testing.assert_close(delta.norm(dim=-1), torch.full((len(x),), 1.5, dtype=torch.float64), **FLOAT64)


def test_masks_flip_a_trained_classifier_and_beat_random_masks():
    model = trained_digits_model()
    data = digits()
    x, y = data.test_x, data.test_y
    rows = compare_attacks(model, x, y, [0.0, 2.0])
    assert rows[0] == {"eps": 0.0, "eigen": 0.0, "gradient": 0.0, "random": 0.0}
    strong = rows[1]
    assert strong["eigen"] > 0.9  # measured 1.0 (pixels in [0, 1]; an 8x8 digit has norm ~3.6)
    assert strong["random"] < 0.5 * strong["eigen"]
    delta, target = eigen_masks(model, x, y, 2.0)
    flipped_to = model(x + delta).argmax(-1)
    correct = model(x).argmax(-1) == y
    # most flips land on the class the weights predicted
    assert float((flipped_to == target)[correct].float().mean()) > 0.8
    assert flip_rate(model, x, y, delta) == strong["eigen"]


def test_bad_attack_inputs_are_one_line_errors():
    model = model64()
    x = pixels()
    y = model(x).argmax(-1)
    with pytest.raises(ValueError) as err:
        eigen_masks(model, x, y, -1.0)
    assert str(err.value) == "eps must be a finite number >= 0, got -1.0"
    with pytest.raises(ValueError, match=r"y must be \[8\] \(one label per image\), got shape \(3,\)"):
        gradient_masks(model, x, y[:3], 1.0)
    with pytest.raises(ValueError, match=r"x has shape \(8, 19\)"):
        eigen_masks(model, x[:, :19], y, 1.0)
    with pytest.raises(ValueError, match="only a bilinear classifier"):
        pair_eigen(model64(mlp_kind="relu"))
