"""Per-class eigen readings of bilinear image classifiers: the pixel-space quadratic form is
the model's logit, the top-k reconstruction equals the model at k = d, and the spectrum /
smoothness summaries match their formulas."""

from __future__ import annotations

import math

import pytest
import torch

from bilinear_lens.models.image_classifier import ImageClassifier
from bilinear_lens.weights.eigen import eigendecompose
from bilinear_lens.weights.image_eigen import (
    class_eigendecomposition,
    effective_rank,
    eigen_summary,
    last_layer_eigendecomposition,
    low_rank_accuracy,
    low_rank_logits,
    neighbour_correlation,
    pixel_interaction_matrices,
    pixel_participation,
    spectral_concentration,
    total_variation,
)
from images_fixtures import digits, small_float64_model, trained_digits_model

# float64 throughout the exactness tests: a sum of d = 20 rank-one terms vs the factored
# forward differs by a few ulps of the ~1e-1 logits (measured <= 2e-15); 1e-12 is a wide margin.
FLOAT64_EXACT = dict(rtol=1e-12, atol=1e-12)


def model64(**overrides) -> ImageClassifier:
    return small_float64_model(3, **overrides)


def pixels(n: int = 9, d: int = 20) -> torch.Tensor:
    return torch.rand(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("d_embed", [0, 6, 30])
def test_pixel_quadratic_form_is_the_logit(d_embed):
    model = model64(d_embed=d_embed)
    x = pixels()
    Q = pixel_interaction_matrices(model)  # [3, 20, 20]
    assert Q.shape == (3, 20, 20)
    torch.testing.assert_close(torch.einsum("ni,cij,nj->nc", x, Q, x), model(x), **FLOAT64_EXACT)


@pytest.mark.parametrize("overrides", [
    dict(), dict(d_embed=0), dict(residual=True), dict(bias=True), dict(bias=True, residual=True),
    dict(n_layers=2, residual=True), dict(n_layers=2), dict(n_layers=2, bias=True),
])
def test_top_k_logits_at_k_equal_d_are_the_model(overrides):
    model = model64(**overrides)
    x = pixels()
    eig = last_layer_eigendecomposition(model)
    d = eig.eigenvalues.shape[-1]
    torch.testing.assert_close(low_rank_logits(model, x, d, eig), model(x), **FLOAT64_EXACT)


def test_top_k_logits_are_the_rank_k_formula():
    model = model64()
    x = pixels()
    eig = class_eigendecomposition(model)
    for k in (0, 1, 3):
        V, lam = eig.eigenvectors[:, :, :k], eig.eigenvalues[:, :k]  # [c, d, k], [c, k]
        expected = torch.einsum("ck,nck->nc", lam, torch.einsum("nd,cdk->nck", x, V) ** 2)
        torch.testing.assert_close(low_rank_logits(model, x, k, eig), expected, **FLOAT64_EXACT)


def test_class_eigenvectors_rebuild_the_pixel_matrix_and_are_images():
    model = model64()
    eig = class_eigendecomposition(model)
    Q = pixel_interaction_matrices(model)
    rebuilt = eig.eigenvectors @ torch.diag_embed(eig.eigenvalues) @ eig.eigenvectors.mT
    torch.testing.assert_close(rebuilt, Q, **FLOAT64_EXACT)
    images, values = eig.images(1, "positive", top=3)
    assert images.shape == (3, 4, 5) and values.tolist() == sorted(values.tolist(), reverse=True)
    assert float(values[0]) == float(eig.eigenvalues[1].max())
    neg_images, neg_values = eig.images(1, "negative", top=2)
    assert float(neg_values[0]) == float(eig.eigenvalues[1].min())
    # the image is the eigenvector: Q v = lambda v in pixel space
    v = neg_images[0].flatten()
    torch.testing.assert_close(Q[1] @ v, neg_values[0] * v, **FLOAT64_EXACT)


def test_non_bilinear_models_and_bad_layers_are_refused():
    with pytest.raises(ValueError) as err:
        class_eigendecomposition(model64(mlp_kind="swiglu"))
    assert str(err.value) == ("mlp_kind='swiglu': only a bilinear classifier's logits are quadratic forms with "
                              "eigenvectors (train with model.mlp_kind=bilinear)")
    with pytest.raises(ValueError, match="layer 0 of a two-layer model without residual has no direct path"):
        class_eigendecomposition(model64(n_layers=2))
    with pytest.raises(ValueError, match=r"k must be an integer in \[0, 20\]"):
        low_rank_logits(model64(), pixels(), 21)
    with pytest.raises(ValueError, match="eigenvectors in the hidden space are not images"):
        last_layer_eigendecomposition(model64(n_layers=2, residual=True)).images(0)


def test_spectrum_summaries_match_their_formulas():
    values = torch.tensor([[4.0, -2.0, 1.0, 0.0], [1.0, 1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    conc = spectral_concentration(values, 1)
    assert conc.tolist() == [16 / 21, 1 / 4, 1.0]
    p = torch.tensor([16, 4, 1], dtype=torch.float64) / 21
    assert math.isclose(float(effective_rank(values)[0]), math.exp(float(-(p * p.log()).sum())), rel_tol=1e-12)
    assert math.isclose(float(effective_rank(values)[1]), 4.0, rel_tol=1e-12)
    assert math.isclose(float(effective_rank(values[:1, :1])[0]), 1.0)


def test_total_variation_formula_and_scale_invariance():
    flat = torch.ones(3, 3)
    assert float(total_variation(flat)) == 0.0
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # unit-norm after /2: four steps of 1
    assert float(total_variation(checker)) == pytest.approx(4.0)
    assert float(total_variation(5 * checker)) == pytest.approx(4.0)
    ramp = torch.tensor([[0.0, 1.0, 2.0]])
    assert float(total_variation(ramp)) == pytest.approx(2 / math.sqrt(5))


def test_sparsity_and_smoothness_match_their_formulas():
    one_pixel = torch.zeros(4, 4)
    one_pixel[1, 2] = -3.0
    assert float(pixel_participation(one_pixel)) == pytest.approx(1 / 16)
    assert float(pixel_participation(torch.full((4, 4), 0.5))) == pytest.approx(1.0)
    assert float(neighbour_correlation(one_pixel)) == 0.0
    flat = torch.ones(2, 3)  # unit norm: entries 1/sqrt(6); 4 horizontal + 3 vertical neighbour pairs
    assert float(neighbour_correlation(flat)) == pytest.approx(7 / 6)
    checker = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert float(neighbour_correlation(checker)) == pytest.approx(-1.0)


def test_trained_model_low_rank_accuracy_converges_to_the_model():
    model = trained_digits_model().double()
    data = digits()
    x, y = data.test_x.double(), data.test_y
    eig = class_eigendecomposition(model)
    acc = low_rank_accuracy(model, x, y, [1, 4, 64], eig)
    assert acc[64] == model.accuracy(x, y) > 0.9
    assert acc[4] > 0.8 > acc[1]  # a few eigenvectors per class carry the classifier (paper §3)
    summary = eigen_summary(eig, k=4)
    assert 0 < summary["concentration@4"] <= 1 and 1 <= summary["effective_rank"] <= 64
    assert summary["total_variation"] > 0 and 0 < summary["pixel_participation"] <= 1
    # the eigenvalues are those of the explicit matrix
    torch.testing.assert_close(eig.eigenvalues, eigendecompose(pixel_interaction_matrices(model)).eigenvalues)
