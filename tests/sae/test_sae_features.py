"""SAE features as output directions and input SAE features as the basis of Q(u), checked
against brute force through the MLP itself (polarization identity)."""

import pytest
import torch

from bilinear_lens.weights.layer_eigen import layer_eigendecomposition
from bilinear_lens.models.model import build_model
from bilinear_lens.sae.features import eigenvector_input_features, feature_interaction_matrix, input_feature_basis
from bilinear_lens.weights.directions import FeatureDirection, resolve_direction, residual_direction_for_logit
from conftest import tiny_config
from fixtures.sae_models import make_sae


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(dtype="float64", normalization_type="RMS")).eval()


def test_residual_feature_is_its_decoder_row(model):
    sae = make_sae("blocks.1.hook_resid_post")
    torch.testing.assert_close(resolve_direction(model, FeatureDirection(sae, 7)), sae.W_dec[7].detach(), rtol=0, atol=0)


def test_final_norm_feature_goes_through_the_norm(model):
    sae = make_sae("ln_final.hook_normalized")
    with torch.no_grad():
        model.ln_final.weight.normal_()
    expected = residual_direction_for_logit(model, sae.W_dec[3].detach())
    torch.testing.assert_close(resolve_direction(model, FeatureDirection(sae, 3)), expected, rtol=0, atol=0)


def test_encoder_read_gives_the_pre_activation_contribution(model):
    """u . y with u = W_enc[:, i] is exactly the change of feature i's pre-activation when y is
    added to the SAE's input (no normalisation: the encoder is affine)."""
    sae = make_sae("blocks.0.hook_resid_mid")
    u = resolve_direction(model, FeatureDirection(sae, 5, read="encoder"))
    r, y = torch.randn(2, 32, dtype=torch.float64).unbind(0)
    with torch.no_grad():
        change = sae.encode_pre(r + y)[5] - sae.encode_pre(r)[5]
    torch.testing.assert_close(u @ y, change, rtol=1e-12, atol=1e-12)  # float64 rounding


@pytest.mark.parametrize(
    "feature, message",
    [
        (FeatureDirection(make_sae("blocks.0.hook_resid_mid"), 48), r"feature index 48 out of range \[0, 48\)"),
        (FeatureDirection(make_sae("blocks.0.hook_resid_mid"), 1, read="both"), r"read='both'; allowed"),
        (FeatureDirection(make_sae("blocks.0.mlp.hook_post", d_in=32), 0), "has no residual-stream direction"),
        (FeatureDirection(make_sae("blocks.0.hook_resid_mid", d_in=16), 0), "d_in=16, but the model's d_model is 32"),
    ],
)
def test_bad_feature_directions(model, feature, message):
    with pytest.raises(ValueError, match=message):
        resolve_direction(model, feature)


def polarized_matrix(model, layer, u, F):
    """M[i, j] = (g(f_i + f_j) - g(f_i) - g(f_j)) / 2 with g(x) = u . MLP(x): the bilinear
    form of the quadratic map g, evaluated through the MLP's own forward (no tensors)."""
    mlp = model.blocks[layer].mlp
    g = lambda x: mlp(x) @ u  # noqa: E731
    n = F.shape[0]
    M = torch.empty(n, n, dtype=F.dtype)
    with torch.no_grad():
        for i in range(n):
            for j in range(n):
                M[i, j] = (g(F[i] + F[j]) - g(F[i]) - g(F[j])) / 2
    return M


def test_feature_interaction_matrix_equals_dense_reference(model):
    sae_in, sae_out = make_sae("blocks.1.hook_resid_mid", seed=1), make_sae("blocks.1.hook_resid_post", seed=2)
    direction = FeatureDirection(sae_out, 11)
    full = feature_interaction_matrix(model, 1, direction, sae_in, n_features=None)
    F = model.blocks[1].ln2(sae_in.W_dec.detach())
    reference = polarized_matrix(model, 1, sae_out.W_dec[11].detach(), F)
    order = full.indices
    torch.testing.assert_close(full.matrix, reference[order][:, order], rtol=1e-9, atol=1e-9)  # float64 rounding
    torch.testing.assert_close(full.scores, reference.norm(dim=-1)[order], rtol=1e-9, atol=1e-9)
    top = feature_interaction_matrix(model, 1, direction, sae_in, n_features=6)
    assert top.indices.tolist() == reference.norm(dim=-1).topk(6).indices.tolist()
    torch.testing.assert_close(top.matrix, reference[top.indices][:, top.indices], rtol=1e-9, atol=1e-9)


def test_input_basis_on_mlp_input_is_used_as_is(model):
    sae = make_sae("blocks.0.mlp.hook_in")
    assert torch.equal(input_feature_basis(model, 0, sae), sae.W_dec.detach())
    with pytest.raises(ValueError, match="cannot be a basis for layer 0's MLP input"):
        input_feature_basis(model, 0, make_sae("blocks.0.mlp.hook_post"))


def test_eigenvector_input_features_by_cosine(model):
    sae_in, sae_out = make_sae("blocks.0.hook_resid_mid", seed=3), make_sae("blocks.0.hook_resid_post", seed=4)
    le = layer_eigendecomposition(model, 0, FeatureDirection(sae_out, 2))
    rows = eigenvector_input_features(model, le, sae_in, n_vectors=3, n_features=5)
    F = model.blocks[0].ln2(sae_in.W_dec.detach())
    for j, row in enumerate(rows):
        cos = torch.nn.functional.cosine_similarity(F, le.eigenvectors[:, j][None], dim=-1)
        assert row.positive_features == cos.argsort(descending=True)[:5].tolist()
        assert row.negative_features == cos.argsort()[:5].tolist()
        torch.testing.assert_close(torch.tensor(row.positive_cosines, dtype=torch.float64), cos.sort(descending=True).values[:5])
        assert row.eigenvalue == float(le.eigenvalues[j])
    with pytest.raises(ValueError, match=r"n_features must be in \[1, 48\], got 0"):
        eigenvector_input_features(model, le, sae_in, n_features=0)
