"""Residual writers: embedding, heads, MLPs and biases (or an SAE basis) sum to the residual."""

import pytest
import torch

from bilinear_lens import to_bridge
from bilinear_lens.circuits.writers import residual_writers, sae_writers
from fixtures.writer_models import TOKENS, make_sae, random_model

# float64 sums of ~20 writers of size ~1: rounding is ~1e-15; 1e-10 leaves a wide margin.
EXACT = dict(rtol=0, atol=1e-10)


CONFIGS = [
    dict(),
    dict(normalization_type="LN", positional_embedding_type="standard", attn_bias=True, mlp_bias=True),
    dict(normalization_type=None, n_layers=3),
]


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"])
def test_writers_sum_to_the_residual(overrides, hook):
    model = random_model(**overrides)
    w = residual_writers(model, TOKENS, hook, positions=[0, 3, -1])
    assert w.positions == [0, 3, 6]
    _, cache = model.run_with_cache(TOKENS)
    torch.testing.assert_close(w.total(), cache[hook][0, [0, 3, 6]], **EXACT)
    n_heads = model.cfg.n_heads
    expected_heads = n_heads * (1 if hook.endswith("pre") else 2)
    assert w.kinds.count("head") == expected_heads
    assert w.kinds.count("mlp") == (1 if hook.endswith(("pre", "mid")) else 2)
    assert ("pos_embed" in w.kinds) == (overrides.get("positional_embedding_type") == "standard")
    assert ("bias" in w.kinds) == bool(overrides.get("attn_bias"))


def test_head_writers_sum_to_attn_out():
    model = random_model(attn_bias=True)
    w = residual_writers(model, TOKENS, "blocks.0.hook_resid_mid", positions=list(range(7)))
    _, cache = model.run_with_cache(TOKENS)
    heads = w.vectors[[i for i, k in enumerate(w.kinds) if k == "head"]].sum(0)
    b_O = model.blocks[0].attn.b_O.detach()
    torch.testing.assert_close(heads + b_O, cache["blocks.0.hook_attn_out"][0], **EXACT)
    # one head's writer against the slow formula z[p, h] @ W_O[h]
    z = cache["blocks.0.attn.hook_z"][0]
    torch.testing.assert_close(w.vectors[w.labels.index("L0H2")], z[:, 2] @ model.blocks[0].attn.W_O[2].detach(), **EXACT)


def test_writers_on_the_bridge_equal_ours():
    model = random_model(normalization_type="LN", positional_embedding_type="standard", mlp_bias=True)
    ours = residual_writers(model, TOKENS, "blocks.1.hook_resid_mid", positions=[2, 6])
    theirs = residual_writers(to_bridge(model), TOKENS, "blocks.1.hook_resid_mid", positions=[2, 6])
    assert theirs.labels == ours.labels
    torch.testing.assert_close(theirs.vectors, ours.vectors, **EXACT)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_mid", "blocks.1.mlp.hook_in"])
def test_sae_writers_with_error_sum_exactly(hook):
    model = random_model()
    sae = make_sae(hook)
    w = sae_writers(model, TOKENS, sae, positions=[1, 6])
    _, cache = model.run_with_cache(TOKENS)
    torch.testing.assert_close(w.total(), cache[hook][0, [1, 6]], **EXACT)
    assert w.space == ("residual" if "resid" in hook else "mlp_input")
    acts = sae.encode(cache[hook][0, [1, 6]])
    assert w.extra["features"] == (acts != 0).any(0).nonzero().flatten().tolist()
    without = sae_writers(model, TOKENS, sae, positions=[1, 6], include_error=False)
    torch.testing.assert_close(without.total(), sae.decode(acts), **EXACT)


def test_bad_inputs_name_the_argument():
    model = random_model()
    with pytest.raises(ValueError, match=r"^positions=7 is out of range for a prompt of 7 tokens"):
        residual_writers(model, TOKENS, "blocks.1.hook_resid_mid", positions=7)
    with pytest.raises(ValueError, match=r"^hook='blocks.2.hook_resid_mid' is not a residual hook"):
        residual_writers(model, TOKENS, "blocks.2.hook_resid_mid")
    with pytest.raises(ValueError, match=r"^sae.cfg.d_in=16 does not match the model's d_model=32"):
        sae_writers(model, TOKENS, make_sae("blocks.1.hook_resid_mid", d_in=16))
    with pytest.raises(ValueError, match=r"^sae.cfg.hook_name='blocks.1.attn.hook_z' is not a basis"):
        sae_writers(model, TOKENS, make_sae("blocks.1.attn.hook_z"))
    with pytest.raises(ValueError, match=r"^tokens must be one prompt"):
        residual_writers(model, torch.zeros(2, 3, dtype=torch.long), "blocks.1.hook_resid_mid")
