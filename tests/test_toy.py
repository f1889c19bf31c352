"""Tests for bilinear_lens.toy: toy models of superposition and the privileged-basis checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bilinear_lens.toy import (
    ToyConfig,
    ToyModel,
    alignment_score,
    evaluate_loss,
    feature_alignment,
    generate_batch,
    model_alignment_score,
    random_rotation,
    rotate_hidden,
    rotation_invariance,
    train_toy_model,
)

# Superposition regime: 20 features in 5 dims, each feature on 1% of the time.
SPARSITY = 0.99
N_INSTANCES = 8  # independently initialised copies, our "seeds"
STEPS = 600


@pytest.fixture(scope="module")
def trained() -> dict[str, ToyModel]:
    """One trained model (8 instances) per hidden-layer kind, shared by the tests below."""
    return {
        kind: train_toy_model(
            ToyConfig(kind=kind, sparsity=SPARSITY, n_instances=N_INSTANCES), steps=STEPS, seed=0
        )
        for kind in ("linear", "relu", "bilinear")
    }


# --- config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"n_hidden": 20}, "n_hidden"),  # not smaller than n_features
        ({"n_hidden": 0}, "n_hidden"),
        ({"n_features": 2.5}, "n_features"),
        ({"kind": "gelu"}, "kind"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"importance_decay": 0.0}, "importance_decay"),
        ({"n_instances": 0}, "n_instances"),
        ({"kind": "bilinear", "tied_decoder": True}, "tied_decoder"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"ToyConfig\.{field}="):
        ToyConfig(**changes)


def test_config_kind_error_lists_allowed_values() -> None:
    with pytest.raises(ValueError, match="linear.*relu.*bilinear"):
        ToyConfig(kind="quadratic")


def test_config_default_decoder_tying() -> None:
    assert ToyConfig(kind="linear").tied_decoder is True
    assert ToyConfig(kind="relu").tied_decoder is True
    assert ToyConfig(kind="bilinear").tied_decoder is False
    importance = ToyConfig(importance_decay=0.5).importance()[:3]
    torch.testing.assert_close(importance, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))


# --- data ---------------------------------------------------------------------------------


def test_generate_batch_has_the_sparse_uniform_distribution() -> None:
    cfg = ToyConfig(sparsity=0.7, n_instances=3)
    x = generate_batch(cfg, 20_000, generator=torch.Generator().manual_seed(0))
    assert x.shape == (20_000, 3, cfg.n_features)
    assert x.min() >= 0 and x.max() <= 1
    zero_fraction = (x == 0).float().mean().item()
    assert abs(zero_fraction - 0.7) < 0.005
    nonzero = x[x > 0]
    assert abs(nonzero.mean().item() - 0.5) < 0.005  # uniform[0, 1]
    assert abs(nonzero.var().item() - 1 / 12) < 0.002


# --- model --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "relu", "bilinear"])
def test_forward_matches_formula(kind: str) -> None:
    cfg = ToyConfig(kind=kind, n_features=6, n_hidden=3, n_instances=2)
    model = ToyModel(cfg, seed=1)
    x = generate_batch(cfg, 4, generator=torch.Generator().manual_seed(2))
    k = 1
    pre = x[:, k] @ model.W[k].T
    if kind == "relu":
        h = F.relu(pre)
    elif kind == "bilinear":
        assert model.W2 is not None
        h = pre * (x[:, k] @ model.W2[k].T)
    else:
        h = pre
    W_dec = model.W[k].T if model.W_dec_free is None else model.W_dec_free[k]
    assert (model.W_dec_free is None) == cfg.tied_decoder
    expected = F.relu(h @ W_dec.T + model.b[k])
    torch.testing.assert_close(model(x)[:, k], expected)


def test_feature_embeddings_are_hidden_response_to_one_hot() -> None:
    for kind, expected in (
        ("linear", lambda m: m.W),
        ("relu", lambda m: F.relu(m.W)),
        ("bilinear", lambda m: m.W * m.W2),
    ):
        model = ToyModel(ToyConfig(kind=kind, n_instances=2), seed=0)
        torch.testing.assert_close(model.feature_embeddings(), expected(model))


# --- training -----------------------------------------------------------------------------


def test_training_reduces_loss(trained: dict[str, ToyModel]) -> None:
    for kind, model in trained.items():
        untrained = ToyModel(model.cfg, seed=0)
        assert (evaluate_loss(model) < 0.8 * evaluate_loss(untrained)).all(), kind


def test_same_seed_gives_identical_weights() -> None:
    cfg = ToyConfig(kind="bilinear", n_instances=2)
    a = train_toy_model(cfg, steps=30, batch_size=64, seed=3)
    b = train_toy_model(cfg, steps=30, batch_size=64, seed=3)
    c = train_toy_model(cfg, steps=30, batch_size=64, seed=4)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
        assert not torch.equal(p, r), name


# --- rotation invariance ------------------------------------------------------------------


def test_random_rotation_is_orthogonal_and_seeded() -> None:
    R = random_rotation(5, seed=7)
    torch.testing.assert_close(R @ R.T, torch.eye(5, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(R, random_rotation(5, seed=7))
    assert not torch.allclose(R, random_rotation(5, seed=8))


def test_linear_hidden_layer_is_rotation_invariant(trained: dict[str, ToyModel]) -> None:
    assert rotation_invariance(trained["linear"], random_rotation(5, seed=1)) < 1e-12


@pytest.mark.parametrize("kind", ["relu", "bilinear"])
def test_elementwise_hidden_layer_is_not_rotation_invariant(
    trained: dict[str, ToyModel], kind: str
) -> None:
    # A relative output change of 5% is far above float error; trained models give O(1).
    assert rotation_invariance(trained[kind], random_rotation(5, seed=1)) > 0.05


def test_rotating_linear_model_keeps_its_loss(trained: dict[str, ToyModel]) -> None:
    model = trained["linear"]
    R = random_rotation(5, seed=2)
    rotated = rotate_hidden(model, R)
    assert not torch.allclose(rotated.W, model.W)  # the weights really moved
    # float32 (the toy models' dtype): R R^T = I to ~1e-7, so the loss moves by float rounding
    # only; a nonlinearity would move it by percents (test above)
    torch.testing.assert_close(evaluate_loss(rotated), evaluate_loss(model), rtol=1e-5, atol=1e-7)
    restored = rotate_hidden(rotated, R.T)
    torch.testing.assert_close(restored.W, model.W, rtol=0, atol=1e-5)
    torch.testing.assert_close(evaluate_loss(restored), evaluate_loss(model), rtol=1e-5, atol=1e-7)


def test_rotating_relu_model_hurts_its_loss(trained: dict[str, ToyModel]) -> None:
    model = trained["relu"]
    rotated = rotate_hidden(model, random_rotation(5, seed=2))
    assert (evaluate_loss(rotated) > evaluate_loss(model)).all()


# --- basis alignment ----------------------------------------------------------------------


def test_alignment_score_bounds() -> None:
    m, n = 5, 12
    one_hot = torch.zeros(m, n)
    one_hot[torch.arange(n) % m, torch.arange(n)] = torch.linspace(0.5, 2.0, n)
    assert alignment_score(one_hot).item() == pytest.approx(1.0)
    signs = torch.where(torch.rand(m, n, generator=torch.Generator().manual_seed(0)) > 0.5, 1.0, -1.0)
    spread = signs * torch.linspace(0.5, 2.0, n) / m**0.5
    assert alignment_score(spread).item() == pytest.approx(1 / m)


def test_alignment_score_ignores_unrepresented_features() -> None:
    E = torch.zeros(2, 3, 4)  # [instances, m, n]
    E[:, 0, 0] = 1.0  # aligned, represented
    E[:, :, 1] = 1.0  # spread, represented -> 1/3
    E[:, :, 2] = 1e-3  # spread but negligible norm: excluded
    # column 3 is exactly zero (NaN alignment) and excluded
    torch.testing.assert_close(alignment_score(E), torch.full((2,), (1 + 1 / 3) / 2))
    assert torch.isnan(feature_alignment(E)[:, 3]).all()


def test_alignment_score_is_scale_invariant_per_feature() -> None:
    E = torch.randn(4, 3, 9, generator=torch.Generator().manual_seed(0))
    scales = torch.rand(9, generator=torch.Generator().manual_seed(1)) + 0.5
    torch.testing.assert_close(feature_alignment(E * scales), feature_alignment(E))


def test_relu_hidden_layer_is_more_basis_aligned_than_linear(trained: dict[str, ToyModel]) -> None:
    linear = model_alignment_score(trained["linear"])
    relu = model_alignment_score(trained["relu"])
    gap = relu.mean() - linear.mean()
    standard_error = (relu.var() / len(relu) + linear.var() / len(linear)).sqrt()
    assert gap > 0.05 and gap > 4 * standard_error, (relu, linear)
    assert relu.min() > linear.mean()  # instance by instance, not just on average


def test_linear_alignment_is_at_chance_level(trained: dict[str, ToyModel]) -> None:
    # No privileged basis: a trained linear model's score is that of randomly rotated copies.
    model = trained["linear"]
    chance = torch.stack(
        [model_alignment_score(rotate_hidden(model, random_rotation(5, seed=s))).mean() for s in range(20)]
    )
    assert abs(model_alignment_score(model).mean() - chance.mean()) < 3 * chance.std() + 0.02
