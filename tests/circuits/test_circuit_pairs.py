"""Exact pair decomposition of a bilinear MLP over residual writers (float64)."""

import pytest
import torch

from bilinear_lens import FeatureDirection, build_model, feature_interaction_matrix, to_bridge
from bilinear_lens.circuits.pairs import mlp_pair_decomposition
from bilinear_lens.circuits.writers import residual_writers
from bilinear_lens.weights.directions import resolve_direction
from conftest import tiny_config
from fixtures.writer_models import TOKENS, make_sae, random_model

# float64 quadratic forms of ~20 writers with O(1) entries: rounding ~1e-14; 1e-10 is a
# 10^4 margin and far below a missing term (O(1e-2) or more with these random weights).
EXACT = dict(rtol=0, atol=1e-10)

NORMS = [
    dict(normalization_type="RMSPre"),
    dict(normalization_type="LNPre"),
    dict(normalization_type=None),
    dict(normalization_type="RMS"),
    dict(normalization_type="LN", positional_embedding_type="standard"),
    dict(normalization_type="RMSPre", mlp_bias=True, attn_bias=True),
    dict(normalization_type="LN", mlp_bias=True, attn_bias=True),
]


def observed(model, layer, u, p):
    _, cache = model.run_with_cache(TOKENS)
    return float(cache[f"blocks.{layer}.hook_mlp_out"][0, p] @ u.detach())


@pytest.mark.parametrize("overrides", NORMS)
@pytest.mark.parametrize("layer", [0, 1])
def test_pairs_sum_to_the_mlp_output_along_u(overrides, layer):
    model = random_model(**overrides)
    pairs = mlp_pair_decomposition(model, TOKENS, layer, 7, position=4)
    u = resolve_direction(model, 7)
    target = observed(model, layer, u, 4)
    assert abs(pairs.total - target) < 1e-10
    assert abs(pairs.observed - target) < 1e-10
    torch.testing.assert_close(pairs.matrix, pairs.matrix.T, rtol=0, atol=0)
    assert ("mlp bias" in pairs.labels) == overrides.get("mlp_bias", False)
    assert ("ln2 bias" in pairs.labels) == (overrides["normalization_type"] == "LN")
    assert (pairs.scale is None) == (overrides["normalization_type"] is None)
    # top pairs over the upper triangle (off-diagonals doubled) also sum to the total
    assert abs(sum(v for _, _, v in pairs.top_pairs(None)) - target) < 1e-10


def frozen_norm(model, layer, r, scale, alpha_bias):
    """ln2 with its scale frozen: a slow, separate reference of the affine map."""
    kind = model.cfg.normalization_type
    ln = model.blocks[layer].ln2
    if kind is None:
        return r
    x = r - r.mean(-1, keepdim=True) if kind in ("LN", "LNPre") else r
    x = x / scale
    if kind in ("RMS", "LN"):
        x = x * ln.weight.detach()
    return x + alpha_bias * ln.bias.detach() if kind == "LN" else x


@pytest.mark.parametrize("overrides", [NORMS[0], NORMS[4], NORMS[6]])
def test_row_sums_are_half_gradient_times_writer(overrides):
    model = random_model(**overrides)
    layer, p = 1, 6
    u = resolve_direction(model, (7, 9))
    pairs = mlp_pair_decomposition(model, TOKENS, layer, (7, 9), position=p)
    writers = residual_writers(model, TOKENS, f"blocks.{layer}.hook_resid_mid", positions=p)
    _, cache = model.run_with_cache(TOKENS)
    scale = cache[f"blocks.{layer}.ln2.hook_scale"][0, p] if model.cfg.normalization_type else None
    mlp = model.blocks[layer].mlp
    r = writers.vectors[:, 0].clone().requires_grad_(True)
    alpha = torch.ones((), dtype=torch.float64, requires_grad=True)  # ln2 bias writer
    beta = torch.ones((), dtype=torch.float64, requires_grad=True)  # mlp bias writer
    with torch.enable_grad():
        x = frozen_norm(model, layer, r.sum(0), scale, alpha)
        zero = torch.zeros((), dtype=torch.float64)
        b_in, b_gate, b_out = (getattr(mlp, n).detach() if getattr(mlp, n) is not None else zero for n in ("b_in", "b_gate", "b_out"))
        out = ((x @ mlp.W_in.detach() + beta * b_in) * (x @ mlp.W_gate.detach() + beta * b_gate)) @ mlp.W_out.detach()
        F = (out + beta**2 * b_out) @ u
        grad_r, grad_alpha, grad_beta = torch.autograd.grad(F, [r, alpha, beta], allow_unused=True)
    reference = list((0.5 * grad_r * r.detach()).sum(-1))
    if "ln2 bias" in pairs.labels:
        reference.append(0.5 * grad_alpha)
    if "mlp bias" in pairs.labels:
        reference.append(0.5 * grad_beta)
    torch.testing.assert_close(pairs.shares, torch.stack(reference), **EXACT)
    assert abs(float(F.detach()) - pairs.total) < 1e-10


def test_on_the_bridge_equals_ours():
    model = random_model(normalization_type="LN", mlp_bias=True)
    ours = mlp_pair_decomposition(model, TOKENS, 1, 5)
    theirs = mlp_pair_decomposition(to_bridge(model), TOKENS, 1, 5)
    assert theirs.labels == ours.labels
    torch.testing.assert_close(theirs.matrix, ours.matrix, **EXACT)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_mid", "blocks.1.mlp.hook_in"])
def test_sae_basis_with_its_error_writer_sums_exactly(hook):
    model = random_model(normalization_type="LN", mlp_bias=True)
    pairs = mlp_pair_decomposition(model, TOKENS, 1, 11, position=3, writers=make_sae(hook))
    assert pairs.labels[-2:] == (["ln2 bias", "mlp bias"] if "resid" in hook else ["sae error", "mlp bias"])
    assert "sae error" in pairs.labels
    assert abs(pairs.total - observed(model, 1, resolve_direction(model, 11), 3)) < 1e-10


@pytest.mark.parametrize("hook, overrides", [("blocks.1.mlp.hook_in", dict()), ("blocks.1.hook_resid_mid", dict(normalization_type=None))])
def test_sae_basis_with_unit_activations_is_the_feature_interaction_matrix(hook, overrides):
    """Activations set to one and no error: the feature block is D Q(u) D^T (where the
    basis needs no norm: on the MLP input, or in a model without norms)."""
    model = random_model(**overrides)
    sae_in, sae_out = make_sae(hook, seed=1), make_sae("blocks.1.hook_resid_post", seed=2)
    direction = FeatureDirection(sae_out, 3)
    from bilinear_lens.circuits.writers import sae_writers

    writers = sae_writers(model, TOKENS, sae_in, positions=2, unit_activations=True, include_error=False)
    assert "sae error" not in writers.labels
    pairs = mlp_pair_decomposition(model, TOKENS, 1, direction, position=2, writers=writers)
    features = [i for i, k in enumerate(pairs.kinds) if k == "sae_feature"]
    assert len(features) == sae_in.cfg.d_sae
    reference = feature_interaction_matrix(model, 1, direction, sae_in, n_features=None)
    dense = torch.empty_like(pairs.matrix[:len(features), :len(features)])
    dense[reference.indices[:, None], reference.indices[None, :]] = reference.matrix
    torch.testing.assert_close(pairs.matrix[features][:, features], dense, **EXACT)


@pytest.mark.parametrize("kind", ["swiglu", "gelu", "relu"])
def test_non_bilinear_layers_are_refused_naming_the_kind(kind):
    model = build_model(tiny_config(dtype="float64", mlp_kind=kind))
    with pytest.raises(ValueError, match=rf"^layer 1 has a '{kind}' MLP"):
        mlp_pair_decomposition(model, TOKENS, 1, 7)


def test_bad_inputs_name_the_argument():
    model = random_model()
    with pytest.raises(ValueError, match=r"^position=9 is out of range for a prompt of 7 tokens"):
        mlp_pair_decomposition(model, TOKENS, 1, 7, position=9)
    with pytest.raises(ValueError, match=r"layer"):
        mlp_pair_decomposition(model, TOKENS, 5, 7)
    with pytest.raises(ValueError, match=r"^sae.cfg.d_in=16 does not match the model's d_model=32"):
        mlp_pair_decomposition(model, TOKENS, 1, 7, writers=make_sae("blocks.1.hook_resid_mid", d_in=16))
    with pytest.raises(ValueError, match=r"^sae.cfg.hook_name='blocks.0.hook_resid_mid' is not layer 1's MLP input"):
        mlp_pair_decomposition(model, TOKENS, 1, 7, writers=make_sae("blocks.0.hook_resid_mid"))
    with pytest.raises(ValueError, match=r"^writers='heads' is invalid"):
        mlp_pair_decomposition(model, TOKENS, 1, 7, writers="heads")


def test_html_view_is_offline():
    model = random_model()
    html = mlp_pair_decomposition(model, TOKENS, 1, 7)._repr_html_()
    assert "<svg" in html and "L0H3" in html
    assert "http://" not in html and "https://" not in html and "<script src" not in html


def test_views_from_labels_and_matrix():
    from bilinear_lens.views.pair_view import pair_matrix_figure, pair_matrix_html

    matrix = torch.tensor([[1.0, -2.0], [-2.0, 0.5]])
    html = pair_matrix_html(labels=["<a>", "b"], matrix=matrix, title="t")
    assert "&lt;a&gt;" in html and "<a>" not in html  # labels are escaped
    assert html.count("<rect") == 4 + 2  # cells + share bars
    assert "&lt;a&gt; x b: -2" in html
    fig = pair_matrix_figure(labels=["a", "b"], matrix=matrix)
    image = fig.axes[0].images[0]
    assert (image.get_array() == matrix.double().numpy()).all() and image.get_clim() == (-2.0, 2.0)
    with pytest.raises(ValueError, match=r"^matrix must be \[n, n\] for n=3 labels, got shape \(2, 2\)"):
        pair_matrix_html(labels=["a", "b", "c"], matrix=matrix)
