"""TransformerLens 4 TransformerBridge wraps our model through the entry-point adapter."""

import warnings
from importlib.metadata import entry_points

import pytest
import torch
from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
from transformer_lens.model_bridge.bridge import TransformerBridge

from bilinear_lens.models.bridge import ARCHITECTURE_NAME, BilinearLensArchitectureAdapter, bridge_config, load_bridge, to_bridge
from bilinear_lens.models.model import build_model
from conftest import MLP_KINDS, tiny_config, FLOAT32_REORDERED


def test_entry_point_registers_adapter():
    names = {ep.name: ep.value for ep in entry_points(group="transformer_lens.architectures")}
    assert names[ARCHITECTURE_NAME] == "bilinear_lens.models.bridge:BilinearLensArchitectureAdapter"
    adapter = ArchitectureAdapterFactory.select_architecture_adapter(bridge_config(tiny_config()))
    assert isinstance(adapter, BilinearLensArchitectureAdapter)


@pytest.mark.parametrize("kind", MLP_KINDS)
def test_bridge_matches_model_and_exposes_hooks(kind, tokens):
    model = build_model(tiny_config(mlp_kind=kind))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no adapter override / alias warnings
        bridge = to_bridge(model)
    assert isinstance(bridge, TransformerBridge)
    logits, cache = bridge.run_with_cache(tokens)
    torch.testing.assert_close(logits, model(tokens), **FLOAT32_REORDERED)
    _, own = model.run_with_cache(tokens)
    shared = [
        "hook_embed",
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_attn_out",
        "blocks.1.hook_resid_post",
        "blocks.1.attn.hook_pattern",
        "blocks.1.attn.hook_z",
        "ln_final.hook_normalized",
    ]
    if kind != "none":
        shared += ["blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", "blocks.1.mlp.hook_in",
                   "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post", "blocks.1.mlp.hook_out"]
    if kind in ("bilinear", "swiglu"):
        shared.append("blocks.1.mlp.hook_pre_linear")
    for name in shared:
        assert cache[name].shape == own[name].shape, name
        torch.testing.assert_close(cache[name], own[name], **FLOAT32_REORDERED, msg=name)
    # q/k/v before rotary: the same values, TransformerLens shape [batch, pos, head, d_head]
    torch.testing.assert_close(cache["blocks.0.attn.hook_q"], own["blocks.0.attn.hook_q"])


def test_bridge_weights_match_model_orientation():
    model = build_model(tiny_config())
    bridge = to_bridge(model)
    for name in ("W_in", "W_gate", "W_out"):
        torch.testing.assert_close(getattr(bridge.blocks[1].mlp, name), getattr(model.blocks[1].mlp, name))
    assert bridge.blocks[0].mlp.W_in.shape == (32, 48)


def test_hook_edit_through_bridge_changes_output(tokens):
    model = build_model(tiny_config())
    bridge = to_bridge(model)
    clean = bridge(tokens)
    zero = lambda t, hook: torch.zeros_like(t)  # noqa: E731
    edited = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.mlp.hook_post", zero)])
    assert (edited - clean).abs().max() > 1e-4
    reference = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", zero)])
    torch.testing.assert_close(edited, reference, **FLOAT32_REORDERED)
    # pattern hooks act inside the attention computation (pattern_fn seam)
    uniform = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: t * 0)])
    assert (uniform - clean).abs().max() > 1e-4


def test_bridge_copies_by_default(tokens):
    model = build_model(tiny_config())
    before = model(tokens)
    to_bridge(model)
    assert type(model.blocks[0].mlp).__name__ == "BilinearMLP"
    torch.testing.assert_close(model(tokens), before)


def test_compatibility_mode_keeps_log_probs(tokens):
    """Weight processing (fold norms, center unembed) must keep the bilinear function:
    TransformerLens' gated bridge would otherwise fall back to SiLU."""
    model = build_model(tiny_config())
    bridge = to_bridge(model)
    bridge.enable_compatibility_mode()
    logits, cache = bridge.run_with_cache(tokens)
    # folding the norms into the weights reorders whole float32 matmuls (not just sums), and
    # centering the unembedding shifts logits by a constant: log-probs, to 10x FLOAT32_REORDERED
    torch.testing.assert_close(logits.log_softmax(-1), model(tokens).log_softmax(-1), rtol=1e-4, atol=1e-4)
    assert "blocks.0.mlp.hook_pre_linear" in cache


def test_load_bridge_from_checkpoint(tmp_path, tokens):
    model = build_model(tiny_config(mlp_kind="relu", positional_embedding_type="standard"))
    model.save_pretrained(tmp_path / "ckpt")
    bridge = load_bridge(tmp_path / "ckpt")
    torch.testing.assert_close(bridge(tokens), model(tokens), **FLOAT32_REORDERED)
    assert "hook_pos_embed" in bridge.run_with_cache(tokens)[1]


def test_to_bridge_rejects_other_modules():
    with pytest.raises(TypeError, match="expects a BilinearTransformer"):
        to_bridge(torch.nn.Linear(2, 2))


def test_bridge_with_tokenizer_tokenizes_like_the_model(tmp_path, small_tokenizer):
    tok = small_tokenizer
    model = build_model(tiny_config(d_vocab=len(tok), n_ctx=64), tokenizer=tok)
    model.save_pretrained(tmp_path / "m")
    bridge = load_bridge(tmp_path / "m")
    text = "Lily lost her red kite. She was not happy."
    assert torch.equal(bridge.to_tokens(text), model.to_tokens(text))
    assert bridge.to_str_tokens(text) == model.to_str_tokens(text)
    torch.testing.assert_close(bridge(text), model(text), **FLOAT32_REORDERED)
