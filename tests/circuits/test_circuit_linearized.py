"""The linearized model: frozen patterns and norm scales, bilinear MLPs split symmetrically.

Exactness claims are checked in float64: the frozen forward equals the real one at the
clean input, its half-Jacobian makes gradient x input sum to the metric (plus the constant
part from biases, measured as the linearized model at zero input), and non-bilinear MLPs are
refused or, with exact=False, measurably inexact (> 1e-7)."""

import pytest
import torch

from bilinear_lens.circuits.linearized import (
    check_exact_mlps,
    gradient_times_input,
    linearization_hooks,
    linearized,
    record_frozen_values,
)
from bilinear_lens.circuits.prompts import one_prompt_tokens
from fixtures.linearized_models import CONFIGS, EXACT, prompt, random_model


def metric(logits):
    return logits[0, -1, 5] - logits[0, -1, 7]


def zero_input_metric(model, tokens):
    """The linearized model's metric with every embedding zeroed: its constant part."""
    zero = lambda act, hook: torch.zeros_like(act)  # noqa: E731
    names = [n for n in ("hook_embed", "hook_pos_embed") if n in model.hook_dict]
    with linearized(model, tokens), torch.no_grad(), model.hooks(fwd_hooks=[(n, zero) for n in names]):
        return float(metric(model(tokens)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_frozen_forward_equals_clean_forward(name):
    model, tokens = random_model(**CONFIGS[name]), prompt()
    with torch.no_grad():
        clean = model(tokens)
        with linearized(model, tokens):
            frozen = model(tokens)
    torch.testing.assert_close(frozen, clean, rtol=0, atol=EXACT)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradient_times_input_is_exact(name):
    """Token attributions + the constant part sum to the metric (Euler on the split MLPs)."""
    model, tokens = random_model(**CONFIGS[name]), prompt()
    attribution, value = gradient_times_input(model, tokens, metric)
    with torch.no_grad():
        assert value == pytest.approx(float(metric(model(tokens))), abs=EXACT)
    constant = zero_input_metric(model, tokens)
    if not any(CONFIGS[name].get(k) for k in ("attn_bias", "mlp_bias")) and CONFIGS[name].get("normalization_type") != "LN":
        assert abs(constant) < EXACT  # no biases: the linearized model is linear, not affine
    assert abs(float(attribution.sum()) + constant - value) < EXACT


def test_split_halves_the_mlp_jacobian():
    """d(split post)/dx = 1/2 d(post)/dx at the clean input, so J_split x = post (Euler)."""
    model, tokens = random_model(), prompt()
    frozen = record_frozen_values(model, tokens)
    mlp = model.blocks[0].mlp
    x0 = model.run_with_cache(tokens, names_filter="blocks.0.mlp.hook_in")[1]["blocks.0.mlp.hook_in"]
    direction = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=x0.dtype)
    post = lambda x: mlp.post_from_pre(mlp.gate(x), getattr(mlp, "in")(x))  # noqa: E731
    _, true_jvp = torch.func.jvp(post, (x0,), (direction,))
    with model.hooks(fwd_hooks=[(n, f) for n, f in linearization_hooks(model, frozen) if n.startswith("blocks.0.mlp")]):
        _, split_jvp = torch.func.jvp(lambda x: mlp.hook_post(mlp.post_from_pre(mlp.hook_pre(mlp.gate(x)), mlp.hook_pre_linear(getattr(mlp, "in")(x)))), (x0,), (direction,))
    torch.testing.assert_close(split_jvp, 0.5 * true_jvp, rtol=0, atol=EXACT)
    _, at_x0 = torch.func.jvp(post, (x0,), (x0,))
    torch.testing.assert_close(0.5 * at_x0, post(x0), rtol=0, atol=EXACT)


@pytest.mark.parametrize("kind", ["swiglu", "gelu", "relu"])
def test_non_bilinear_refused(kind):
    model, tokens = random_model(mlp_kind=kind), prompt()
    with pytest.raises(ValueError, match=rf"^layer 0 has mlp_kind='{kind}', not 'bilinear': the linearized model is exact only"):
        with linearized(model, tokens):
            pass


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_non_bilinear_flagged_inexact(kind):
    """Negative control. (ReLU without biases is degree-1 homogeneous, so gradient x input
    happens to be exact for it; it is refused all the same, as biases break that.)"""
    model, tokens = random_model(mlp_kind=kind), prompt()
    with pytest.raises(ValueError, match=f"mlp_kind='{kind}'"):
        check_exact_mlps(model)
    attribution, value = gradient_times_input(model, tokens, metric, exact=False)
    assert abs(float(attribution.sum()) - value) > 1e-7  # negative control: not exact
    assert not record_frozen_values(model, tokens).exact


def test_one_prompt_only():
    model = random_model()
    with pytest.raises(ValueError, match=r"^tokens must be one prompt \(\[pos\] or \[1, pos\] ids, or text\), got shape \(2, 4\)$"):
        one_prompt_tokens(model, torch.zeros(2, 4, dtype=torch.long))
    assert one_prompt_tokens(model, [1, 2, 3]).shape == (1, 3)


@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")  # the freezing does, on purpose
def test_bridge_is_linearized_the_same_way():
    """The hooks are TransformerLens hook names, so to_bridge(model) linearizes identically."""
    from bilinear_lens.models.bridge import to_bridge

    model, tokens = random_model(**CONFIGS["ln-biases"]), prompt()
    ours = gradient_times_input(model, tokens, metric)
    bridge = gradient_times_input(to_bridge(model), tokens, metric)
    torch.testing.assert_close(bridge[0], ours[0], rtol=0, atol=EXACT)
    assert abs(bridge[1] - ours[1]) < EXACT
