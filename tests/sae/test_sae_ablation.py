"""Batched neuron ablation read on an SAE feature equals one hooked forward per neuron."""

import pytest
import torch

from bilinear_lens.activations.ablation import ablate_neurons, loss_metric
from bilinear_lens.models.model import build_model
from bilinear_lens.sae.ablation import feature_ablation_sweep
from bilinear_lens.weights.directions import FeatureDirection
from conftest import tiny_config
from fixtures.sae_models import make_sae


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(dtype="float64", normalization_type="RMS")).eval()


def one_at_a_time(model, tokens, layer, feature, neurons, method):
    """The reference: a hooked forward per neuron (the sweep's pre-batching implementation)."""
    hook = feature.sae.cfg.hook_name

    @torch.no_grad()
    def read():
        logits, cache = model.run_with_cache(tokens, names_filter=[hook])
        return float(feature.sae.encode(cache[hook])[..., feature.index].mean()), float(loss_metric(tokens)(logits))

    clean = read()
    rows = []
    for n in neurons:
        with ablate_neurons(model, layer, [n], method=method, reference=None if method == "zero" else tokens, seed=3):
            f, loss = read()
        rows.append([f - clean[0], loss - clean[1]])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_batched_sweep_equals_one_forward_per_neuron(model, method):
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(1))
    sae = make_sae("blocks.1.hook_resid_post")
    _, cache = model.run_with_cache(tokens, names_filter=[sae.cfg.hook_name])
    busiest = int(sae.encode(cache[sae.cfg.hook_name]).mean((0, 1)).argmax())  # top-k: most features are off
    feature = FeatureDirection(sae, busiest)
    neurons = [0, 3, 7, 8, 20]
    # 2 per pass: passes of 2, 2 and 1 copies, so the last (partial) pass is covered too
    table = feature_ablation_sweep(model, tokens, 0, feature, method=method, seed=3, neurons=neurons, ablations_per_pass=2)
    expected = one_at_a_time(model, tokens, 0, feature, neurons, method)
    got = torch.stack([table.columns["delta_feature"], table.columns["delta_loss"]], dim=-1)
    # float64 throughout; stacking copies along the batch only changes GEMM blocking: 1e-10
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert table.columns["neuron"].tolist() == neurons
    assert expected[:, 0].abs().max() > 1e-4  # the feature does move: the check is not vacuous


def test_a_feature_read_before_the_ablated_layer_does_not_move(model):
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 8), generator=torch.Generator().manual_seed(2))
    feature = FeatureDirection(make_sae("blocks.0.hook_resid_mid"), 1)  # layer 0's MLP input
    table = feature_ablation_sweep(model, tokens, 0, feature, neurons=[1, 2, 3])
    assert torch.equal(table.columns["delta_feature"], torch.zeros(3, dtype=torch.float64))
    assert (table.columns["delta_loss"] != 0).any()


def test_bad_inputs_are_named(model):
    tokens = torch.zeros(1, 4, dtype=torch.long)
    feature = FeatureDirection(make_sae("blocks.1.hook_resid_post"), 1)
    with pytest.raises(ValueError, match="ablations_per_pass must be a positive int, got 0"):
        feature_ablation_sweep(model, tokens, 0, feature, neurons=[1], ablations_per_pass=0)
    with pytest.raises(ValueError, match="tokens must be a \\[batch, pos\\] tensor"):
        feature_ablation_sweep(model, tokens[0], 0, feature)
    with pytest.raises(ValueError, match="feature index 99 out of range"):
        feature_ablation_sweep(model, tokens, 0, FeatureDirection(feature.sae, 99))


def test_bridge_runs_whole_forwards_with_the_same_numbers(model):
    from bilinear_lens.models.bridge import to_bridge

    tokens = torch.randint(0, model.cfg.d_vocab, (2, 10), generator=torch.Generator().manual_seed(4))
    sae = make_sae("blocks.1.hook_resid_pre")
    feature = FeatureDirection(sae, 0)
    ours = feature_ablation_sweep(model, tokens, 0, feature, neurons=range(0, 40, 7), ablations_per_pass=3)
    theirs = feature_ablation_sweep(to_bridge(model), tokens, 0, feature, neurons=range(0, 40, 7), ablations_per_pass=3)
    # the bridge has no restart inside the MLP: whole forwards, same float64 numbers (1e-10 as the neuron sweep)
    for column in ("delta_feature", "delta_loss"):
        torch.testing.assert_close(theirs.columns[column], ours.columns[column], rtol=0, atol=1e-10)


def test_feature_effects_carry_document_clustered_uncertainty(model):
    """As ablation_sweep: ``delta_feature_se`` is the CR1 standard error over documents of the
    per-token feature deltas (here computed one hooked forward per neuron), with t p-values and
    Benjamini-Hochberg q-values over the swept neurons."""
    import math

    from scipy import stats

    from bilinear_lens.activations.ablation.uncertainty import false_discovery_q_values

    tokens = torch.randint(0, model.cfg.d_vocab, (4, 10), generator=torch.Generator().manual_seed(5))
    documents = torch.tensor([0, 0, 1, 2])[:, None].expand(-1, 10).clone()
    sae = make_sae("blocks.1.hook_resid_post")
    hook = sae.cfg.hook_name
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
    feature = FeatureDirection(sae, int(sae.encode(cache[hook]).mean((0, 1)).argmax()))
    neurons = [0, 3, 7, 8]
    table = feature_ablation_sweep(model, tokens, 0, feature, neurons=neurons, documents=documents)
    assert table.uncertainty == {"clusters": "documents", "n_clusters": {"feature": 3, "loss": 3}}

    def per_token():
        with torch.no_grad():
            _, c = model.run_with_cache(tokens, names_filter=[hook])
            return sae.encode(c[hook])[..., feature.index].double().reshape(-1)

    clean = per_token()
    docs = documents.reshape(-1)
    for i, n in enumerate(neurons):
        with ablate_neurons(model, 0, [n]):
            d = per_token() - clean
        m = d.mean()
        spread = sum(float((d[docs == g].sum() - (docs == g).sum() * m) ** 2) for g in range(3))
        se = math.sqrt(3 / 2 * spread) / d.numel()
        assert table["delta_feature_se"][i].item() == pytest.approx(se, rel=1e-8, abs=1e-15)
        if se > 0:
            t = abs(m.item()) / se
            assert table["delta_feature_p"][i].item() == pytest.approx(2 * stats.t.sf(t, df=2), rel=1e-6)
    assert torch.allclose(table["delta_feature_q"], false_discovery_q_values(table["delta_feature_p"]), equal_nan=True)
    assert not torch.isnan(table["delta_loss_se"]).any()
