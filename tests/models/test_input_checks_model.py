"""Bad input to the model, its cache and hooks, sampling, the loss, capture, ablation sweeps
and polytope tracking: a one-line error of a clear type naming the argument (or hook) and
the value, never a raw error from deep inside torch, numpy or TransformerLens, never a
silent NaN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens.ActivationCache import ActivationCache

from bilinear_lens.activations.ablation import ablation_sweep, patch_neurons
from bilinear_lens.activations.capture import capture_activations
from bilinear_lens.activations.polytope import RegionTracker, track_regions
from bilinear_lens.activations.spline_codes import hamming, pairwise_hamming
from bilinear_lens.models.hook_names import UnknownHookError
from bilinear_lens.models.model import build_model, next_token_loss
from bilinear_lens.models.sampling import sample_next_token
from conftest import tiny_config


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config())


@pytest.fixture(scope="module")
def toks():
    return torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def cache(model, toks):
    return model.run_with_cache(toks)[1]


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# ---- 1. cache lookups -----------------------------------------------------------------------


def test_cache_is_an_activation_cache_that_still_resolves_tl_keys(cache, toks):
    assert isinstance(cache, ActivationCache)
    assert torch.equal(cache["mlp_out", 1], cache["blocks.1.hook_mlp_out"])
    assert torch.equal(cache["mlp_out", -1], cache["blocks.1.hook_mlp_out"])  # TL's negative layers
    assert torch.equal(cache["post", 0, "mlp"], cache["blocks.0.mlp.hook_post"])
    assert cache.accumulated_resid().shape == (3, *toks.shape, 32)  # TL methods index through __getitem__


def test_unknown_cache_name_lists_close_matches(cache):
    with pytest.raises(UnknownHookError) as err:
        cache["blocks.0.mlp.hook_foo"]
    assert "unknown hook name 'blocks.0.mlp.hook_foo'" in one_line(err)
    assert "did you mean" in str(err.value) and "blocks.0.mlp.hook_" in str(err.value)
    assert isinstance(err.value, KeyError)  # TransformerLens code catching KeyError still works


@pytest.mark.parametrize("layer", [7, 2, -3])
def test_cache_layer_out_of_range_says_so(cache, layer):
    with pytest.raises(UnknownHookError) as err:
        cache["mlp_out", layer]
    assert f"layer {layer} is out of range: the model has 2 layers [0, 2)" in one_line(err)


@pytest.mark.parametrize("key", [5, ("mlp_out", "0"), ("mlp_out", True), ()])
def test_malformed_cache_keys_are_named(cache, key):
    with pytest.raises(UnknownHookError) as err:
        cache[key]
    assert repr(key) in one_line(err)


def test_a_name_filtered_out_of_the_cache_says_it_was_not_cached(model, toks):
    _, cache = model.run_with_cache(toks, names_filter="blocks.0.hook_resid_pre")
    with pytest.raises(UnknownHookError, match=r"'blocks\.0\.hook_resid_post' .* was not cached"):
        cache["blocks.0.hook_resid_post"]


# ---- 2. hooks returning the wrong shape ------------------------------------------------------


def _truncate(activation, hook):
    return activation[..., :5]


@pytest.mark.parametrize("name", ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_z"])
def test_a_hook_returning_the_wrong_shape_is_named(model, toks, name):
    with pytest.raises(ValueError) as err:
        model.run_with_hooks(toks, fwd_hooks=[(name, _truncate)])
    text = one_line(err)
    shape = tuple(model.run_with_cache(toks, names_filter=name)[1][name].shape)
    assert f"_truncate on {name!r}" in text
    assert f"returned shape {(*shape[:-1], 5)}" in text and f"has shape {shape}" in text


def test_hook_shape_checks_cover_filters_add_hook_and_non_tensors(model, toks):
    with pytest.raises(ValueError, match=r"on 'blocks\.0\.hook_resid_mid' returned shape \(2, 7, 5\)"):
        model.run_with_hooks(toks, fwd_hooks=[(lambda n: n == "blocks.0.hook_resid_mid", _truncate)])
    model.add_hook("blocks.1.hook_resid_post", _truncate)
    try:
        with pytest.raises(ValueError, match=r"on 'blocks\.1\.hook_resid_post' returned shape"):
            model(toks)
    finally:
        model.reset_hooks(including_permanent=True)
    with pytest.raises(TypeError, match=r"on 'blocks\.0\.hook_resid_pre' returned tuple"):
        model.run_with_hooks(toks, fwd_hooks=[("blocks.0.hook_resid_pre", lambda a, hook: (a,))])


def test_hooks_of_the_right_shape_still_edit(model, toks):
    zeroed = model.run_with_hooks(toks, fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: a * 0)])
    expected = model.unembed(model.ln_final(torch.zeros(*toks.shape, 32)))
    torch.testing.assert_close(zeroed, expected)
    assert torch.equal(model.run_with_hooks(toks, fwd_hooks=[("hook_embed", lambda a, hook: None)]), model(toks))


# ---- 3-5. tokenizing, sampling, the loss ---------------------------------------------------


@pytest.mark.parametrize("text, what", [(5, "got int"), ([], "got an empty list"), (["a", 3], "holding int 3 at index 1")])
def test_to_tokens_names_what_text_was(text, what):
    model = build_model(tiny_config())  # no tokenizer needed: the type is checked first
    with pytest.raises(ValueError) as err:
        model.to_tokens(text)
    assert one_line(err).startswith("text must be a str or a non-empty list of str") and what in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sample_next_token_refuses_non_finite_logits(bad):
    logits = torch.zeros(3, 11)
    logits[1, 4] = bad
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError) as err:
            sample_next_token(logits, temperature=temperature)
        assert one_line(err).startswith("logits row 1 has NaN, +inf")


def test_sample_next_token_refuses_an_all_minus_inf_row_but_allows_excluded_tokens():
    logits = torch.zeros(2, 5)
    logits[0, 1:] = -torch.inf  # excluded tokens: fine
    gen = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, generator=gen)[0, 0] == 0
    logits[1] = -torch.inf
    with pytest.raises(ValueError, match="logits row 1 has NaN, \\+inf or no finite value"):
        sample_next_token(logits, generator=gen)


def test_next_token_loss_checks_shapes(toks):
    logits = torch.randn(2, 7, 97, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"tokens \(2, 4\) and logits \(2, 5, 97\) disagree"):
        next_token_loss(logits[:, :5], toks[:, :4])
    with pytest.raises(ValueError, match=r"logits must be a float \[batch, pos, d_vocab\] tensor, got .*\(2, 97\)"):
        next_token_loss(logits[:, 0], toks)
    with pytest.raises(ValueError, match=r"tokens must be an integer \[batch, pos\] tensor, got torch.float32"):
        next_token_loss(logits, toks.float())
    with pytest.raises(ValueError, match=r"attention_mask must have the tokens' shape \(2, 7\), got \(2, 6\)"):
        next_token_loss(logits, toks, attention_mask=torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="needs at least 2 positions"):
        next_token_loss(logits[:, :1], toks[:, :1])
    assert next_token_loss(logits[:, :1], toks[:, :1], per_token=True).shape == (2, 0)
    assert torch.isfinite(next_token_loss(logits, toks))


# ---- 6. capture -----------------------------------------------------------------------------


def test_capture_takes_a_single_hook_name(model, toks):
    one = capture_activations(model, toks, "blocks.0.hook_resid_mid")
    assert list(one) == ["blocks.0.hook_resid_mid"]
    assert torch.equal(one["blocks.0.hook_resid_mid"], capture_activations(model, toks, ["blocks.0.hook_resid_mid"])["blocks.0.hook_resid_mid"])
    with pytest.raises(UnknownHookError, match="'blocks.0.hook_resid_midd'"):
        capture_activations(model, toks, "blocks.0.hook_resid_midd")
    with pytest.raises(TypeError, match="names must hold hook names"):
        capture_activations(model, toks, ["blocks.0.hook_resid_mid", 3])


# ---- 7. ablation sweeps -----------------------------------------------------------------------


@pytest.mark.parametrize("position", [100, -8, 7])
def test_sweep_position_out_of_range_is_named(model, toks, position):
    with pytest.raises(ValueError) as err:
        ablation_sweep(model, toks, 0, neurons=[1], logit=3, position=position, progress=False)
    assert f"position={position} is out of range for tokens with 7 positions" in one_line(err)
    assert "[-7, 7)" in str(err.value)


def test_sweep_reference_is_checked_under_its_name(model, toks):
    with pytest.raises(ValueError, match=r"^reference must be an integer tensor of token ids, got torch.float32$"):
        ablation_sweep(model, toks, 0, neurons=[1], method="resample", reference=torch.randn(2, 3), progress=False)
    with pytest.raises(ValueError, match=r"^reference holds token ids in \[0, 500\], outside .* \[0, 97\)$"):
        ablation_sweep(model, toks, 0, neurons=[1], method="mean", reference=torch.tensor([[0, 500]]), progress=False)


def test_sweep_refuses_one_token_rows_instead_of_nan(model, toks):
    with pytest.raises(ValueError, match=r"^tokens has 1 position\(s\) per row, need at least 2"):
        ablation_sweep(model, toks[:, :1], 0, neurons=[1], progress=False)
    table = ablation_sweep(model, toks[:, :2], 0, neurons=[1], progress=False)
    assert np.isfinite(table.baseline["loss"]) and torch.isfinite(table["delta_loss"]).all()


def test_patch_neurons_names_its_token_arguments(model, toks):
    with pytest.raises(ValueError, match=r"^corrupted_tokens must be an integer tensor"):
        patch_neurons(model, toks, toks.float(), 0, neurons=[1], metric=lambda logits: logits.mean(), progress=False)


# ---- 8. polytope ------------------------------------------------------------------------------


def test_track_regions_checks_token_labels_and_counts(model, toks):
    with pytest.raises(ValueError, match=r"token_labels must hold one label per token id, shape \(97,\) .* got shape \(5,\)"):
        track_regions(model, [toks], token_labels=np.zeros(5, dtype=int), progress=False)
    with pytest.raises(ValueError, match=r"token_labels must be integers .* got dtype float64"):
        track_regions(model, [toks], token_labels=np.zeros(97), progress=False)
    with pytest.raises(ValueError, match=r"^examples_per_region must be an int >= 0, got -1$"):
        track_regions(model, [toks], examples_per_region=-1, progress=False)
    with pytest.raises(ValueError, match=r"^context_width must be an int >= 1"):
        track_regions(model, [toks], context_width=0, progress=False)
    with pytest.raises(ValueError, match=r"^hamming_sample must be an int >= 0, got -2$"):
        RegionTracker(hamming_sample=-2)
    tracker, _ = track_regions(model, [toks], token_labels=torch.arange(97) % 3, progress=False)
    assert sum(tracker.label_counts.values()) == toks.numel()


def test_hamming_refuses_codes_of_different_widths():
    a, b = torch.zeros(3, 2, dtype=torch.uint8), torch.zeros(3, 5, dtype=torch.uint8)
    for fn in (hamming, pairwise_hamming):
        with pytest.raises(ValueError, match=r"codes of different widths: a has 2 bytes per code .* b has 5"):
            fn(a, b)
    assert hamming(torch.full((3, 2), 255, dtype=torch.uint8), torch.zeros(1, 2, dtype=torch.uint8)).tolist() == [16] * 3
    with pytest.raises(ValueError, match=r"do not broadcast"):
        hamming(torch.zeros(3, 2, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8))
