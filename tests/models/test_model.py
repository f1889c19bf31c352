"""The transformer: every MLP kind builds and runs, hooks fire by TransformerLens names."""

import pytest
import torch

from bilinear_lens.models.hook_names import UnknownHookError
from bilinear_lens.models.mlp import BilinearMLP, GatedMLP, MLP
from bilinear_lens.models.model import build_model, next_token_loss
from conftest import MLP_KINDS, tiny_config, FLOAT32_REORDERED

MLP_HOOKS = {
    "bilinear": ["hook_in", "hook_pre", "hook_pre_linear", "hook_post", "hook_out"],
    "swiglu": ["hook_in", "hook_pre", "hook_pre_linear", "hook_post", "hook_out"],
    "relu": ["hook_in", "hook_pre", "hook_post", "hook_out"],
    "gelu": ["hook_in", "hook_pre", "hook_post", "hook_out"],
    "linear": ["hook_in", "hook_pre", "hook_post", "hook_out"],
    "none": [],
}


@pytest.mark.parametrize("kind", MLP_KINDS)
def test_each_kind_runs_with_cache(kind, tokens):
    model = build_model(tiny_config(mlp_kind=kind))
    logits, cache = model.run_with_cache(tokens)
    assert logits.shape == (3, 11, 97)
    b, p, d, h, dh = 3, 11, 32, 4, 8
    expected = {
        "hook_embed": (b, p, d),
        "blocks.1.hook_resid_pre": (b, p, d),
        "blocks.1.attn.hook_q": (b, p, h, dh),
        "blocks.1.attn.hook_attn_scores": (b, h, p, p),
        "blocks.1.attn.hook_pattern": (b, h, p, p),
        "blocks.1.attn.hook_z": (b, p, h, dh),
        "blocks.1.hook_attn_out": (b, p, d),
        "blocks.1.hook_resid_post": (b, p, d),
        "ln_final.hook_normalized": (b, p, d),
    }
    for name in MLP_HOOKS[kind]:
        expected[f"blocks.1.mlp.{name}"] = (b, p, d) if name in ("hook_in", "hook_out") else (b, p, 48)
    if kind != "none":
        expected["blocks.1.hook_mlp_out"] = (b, p, d)
        expected["blocks.1.hook_resid_mid"] = (b, p, d)
    for name, shape in expected.items():
        assert tuple(cache[name].shape) == shape, name
    if kind == "none":
        assert not any(".mlp." in k for k in cache.keys())
    # cached run equals plain run (fused attention kernel vs explicit pattern)
    torch.testing.assert_close(logits, model(tokens), **FLOAT32_REORDERED)


def test_kind_builds_the_right_module():
    assert isinstance(build_model(tiny_config()).blocks[0].mlp, BilinearMLP)
    swiglu = build_model(tiny_config(mlp_kind="swiglu")).blocks[0].mlp
    assert isinstance(swiglu, GatedMLP) and swiglu.act_name == "silu"
    assert isinstance(build_model(tiny_config(mlp_kind="linear")).blocks[0].mlp, MLP)
    assert not hasattr(build_model(tiny_config(mlp_kind="none")).blocks[0], "mlp")


def test_residual_stream_decomposes(tokens):
    model = build_model(tiny_config())
    _, cache = model.run_with_cache(tokens)
    for layer in range(2):
        resid = cache[f"blocks.{layer}.hook_resid_pre"] + cache[f"blocks.{layer}.hook_attn_out"]
        torch.testing.assert_close(resid, cache[f"blocks.{layer}.hook_resid_mid"])
        torch.testing.assert_close(resid + cache[f"blocks.{layer}.hook_mlp_out"], cache[f"blocks.{layer}.hook_resid_post"])
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern[..., 0]))
    assert torch.all(pattern.triu(1) == 0), "attention must be causal"


def test_causality(tokens):
    """Changing a later token never changes earlier logits."""
    model = build_model(tiny_config())
    edited = tokens.clone()
    edited[:, 7] = (edited[:, 7] + 1) % 97
    torch.testing.assert_close(model(tokens)[:, :7], model(edited)[:, :7])
    assert not torch.allclose(model(tokens)[:, 7:], model(edited)[:, 7:])


def test_hook_on_post_changes_output_and_zeroing_equals_no_mlp(tokens):
    model = build_model(tiny_config())
    clean = model(tokens)
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_post", lambda t, hook: torch.zeros_like(t))])
    assert (clean - zeroed).abs().max() > 1e-4
    removed = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", lambda t, hook: torch.zeros_like(t))])
    torch.testing.assert_close(zeroed, removed)
    torch.testing.assert_close(model(tokens), clean)  # hooks were removed


def test_learned_positions_and_layernorm(tokens):
    model = build_model(tiny_config(positional_embedding_type="standard", normalization_type="LN", mlp_bias=True, attn_bias=True))
    logits, cache = model.run_with_cache(tokens)
    assert cache["hook_pos_embed"].shape == (3, 11, 32)
    assert model.W_pos.shape == (16, 32)
    assert model.W_E.shape == (97, 32) and model.W_U.shape == (32, 97)


def test_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(tiny_config(seed=5))
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = build_model(tiny_config(seed=5))
    c = build_model(tiny_config(seed=6))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.blocks[0].mlp.W_in, c.blocks[0].mlp.W_in)


def test_same_init_rule_for_all_kinds():
    """Shared weights (embeddings, attention) are identical across kinds with one seed."""
    models = [build_model(tiny_config(mlp_kind=k)) for k in ("bilinear", "relu", "swiglu")]
    for m in models[1:]:
        assert torch.equal(m.W_E, models[0].W_E)
    stds = [m.blocks[0].mlp.W_in.std().item() for m in models]
    assert max(stds) / min(stds) < 1.2


def test_loss_matches_cross_entropy(tokens):
    model = build_model(tiny_config())
    logits, loss = model(tokens, return_type="both")
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, ref)
    assert next_token_loss(logits, tokens, per_token=True).shape == (3, 10)


def test_bad_inputs_are_named():
    model = build_model(tiny_config())
    with pytest.raises(ValueError, match="n_ctx is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        model(torch.full((1, 4), 97))
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="return_type"):
        model(torch.zeros(1, 4, dtype=torch.long), return_type="probs")
    with pytest.raises(ValueError, match="no tokenizer"):
        model("hello")
    with pytest.raises(UnknownHookError, match=r"unknown hook name 'blocks.0.mlp.hook_pos'.*did you mean \['blocks.0.mlp.hook_post'"):
        model.run_with_hooks(torch.zeros(1, 4, dtype=torch.long), fwd_hooks=[("blocks.0.mlp.hook_pos", lambda t, hook: t)])
    with pytest.raises(UnknownHookError, match="blocks.9.mlp.hook_pre"):
        model.run_with_cache(torch.zeros(1, 4, dtype=torch.long), names_filter=["blocks.9.mlp.hook_pre"])
    with pytest.raises(UnknownHookError):
        with model.hooks(fwd_hooks=[("hook_nope", lambda t, hook: t)]):
            pass


def test_float64_model(tokens):
    model = build_model(tiny_config(dtype="float64"))
    assert model(tokens).dtype == torch.float64


def test_start_and_stop_at_layer(tokens):
    model = build_model(tiny_config(n_layers=3))
    logits, cache = model.run_with_cache(tokens)
    for layer in range(3):
        resid = cache[f"blocks.{layer}.hook_resid_pre"]
        torch.testing.assert_close(model(resid, start_at_layer=layer), logits, **FLOAT32_REORDERED)
        torch.testing.assert_close(model(tokens, stop_at_layer=layer), resid)
    torch.testing.assert_close(model(tokens, stop_at_layer=3), cache["blocks.2.hook_resid_post"])
    resid = cache["blocks.1.hook_resid_pre"]
    torch.testing.assert_close(
        model(resid, start_at_layer=1, return_type="loss", tokens=tokens), model(tokens, return_type="loss")
    )
    # hooks of skipped layers do not fire
    fired = []
    model.run_with_hooks(resid, start_at_layer=1, fwd_hooks=[("blocks.0.hook_resid_post", lambda t, hook: fired.append(1))])
    assert not fired
    with pytest.raises(ValueError, match="needs tokens= for the loss"):
        model(resid, start_at_layer=1, return_type="loss")
    with pytest.raises(ValueError, match=r"residual stream \[batch, pos, 32\]"):
        model(tokens, start_at_layer=1)
    with pytest.raises(ValueError, match=r"start_at_layer=4 is out of range \[0, 3\]"):
        model(resid, start_at_layer=4)
