"""TransformerLens completeness of our own model: ActivationCache, stacked weights,
TransformerLens keyword arguments, generate, and hook parity with the bridge."""

from __future__ import annotations

import pytest
import torch
from transformer_lens.ActivationCache import ActivationCache
from transformers import PreTrainedTokenizerFast

from bilinear_lens.data.tokenizer import SPECIAL_TOKEN, to_hf_tokenizer
from bilinear_lens.models.bridge import to_bridge
from bilinear_lens.models.model import build_model
from bilinear_lens.models.sampling import filter_logits
from conftest import MLP_KINDS, tiny_config, FLOAT32_REORDERED
from fixtures.tokenizers import SMALL, stories_backend

TEXTS = ["Lily was not happy.", "The dog ran to the park and found a big red ball."]


@pytest.fixture(scope="module")
def backend():
    return stories_backend(*SMALL)


@pytest.fixture(scope="module")
def model(backend):
    tok = to_hf_tokenizer(backend)
    return build_model(tiny_config(d_vocab=len(tok), n_ctx=64), tokenizer=tok).eval()


def test_run_with_cache_returns_activation_cache(model):
    logits, cache = model.run_with_cache(TEXTS[0])
    assert isinstance(cache, ActivationCache)
    assert torch.equal(cache["mlp_out", 0], cache["blocks.0.hook_mlp_out"])
    assert torch.equal(cache["pattern", 1], cache["blocks.1.attn.hook_pattern"])
    final = cache["blocks.1.hook_resid_post"]
    # decompose_resid: embed + attn/mlp outputs of each layer, summing to the final residual
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    torch.testing.assert_close(parts.sum(0), final)
    torch.testing.assert_close(cache.accumulated_resid()[-1], final)
    # logit attributions through the parameter-free final RMSNorm add up to the logits
    targets = logits.argmax(-1)  # [batch, pos]: one token per position
    attrs = cache.logit_attrs(cache.decompose_resid(), tokens=targets)  # logit_attrs applies ln_final
    torch.testing.assert_close(attrs.sum(0), logits.gather(-1, targets[..., None])[..., 0], rtol=1e-4, atol=1e-4)
    _, plain = model.run_with_cache(TEXTS[0], return_cache_object=False)
    assert type(plain) is dict and plain.keys() == cache.keys()
    # per-head and per-neuron decomposition (uses attn.W_O and mlp.W_out of each block)
    cache.compute_head_results()
    torch.testing.assert_close(cache["result", 0].sum(-2), cache["attn_out", 0])
    full, names = cache.get_full_resid_decomposition(expand_neurons=True, return_labels=True)
    assert len(names) == 2 * 4 + 2 * 48 + 2 and names[-2:] == ["embed", "bias"]
    torch.testing.assert_close(full.sum(0), final)


def test_stacked_weights_have_tl_shapes_and_compute_the_hooks(model):
    L, H, D, Dh, M, V = 2, 4, 32, 8, 48, model.cfg.d_vocab
    shapes = {"W_E": (V, D), "W_U": (D, V), "W_Q": (L, H, D, Dh), "W_K": (L, H, D, Dh), "W_V": (L, H, D, Dh),
              "W_O": (L, H, Dh, D), "W_in": (L, D, M), "W_gate": (L, D, M), "W_out": (L, M, D)}
    for name, shape in shapes.items():
        assert tuple(getattr(model, name).shape) == shape, name
    assert model.b_Q is None and model.b_in is None and model.W_pos is None
    _, cache = model.run_with_cache(TEXTS[1])
    for l in range(L):
        x = cache[f"blocks.{l}.ln1.hook_normalized"]
        for hook, W in (("q", model.W_Q), ("k", model.W_K), ("v", model.W_V)):
            torch.testing.assert_close(torch.einsum("bpd,hde->bphe", x, W[l]), cache[f"blocks.{l}.attn.hook_{hook}"])
        z = cache[f"blocks.{l}.attn.hook_z"]
        torch.testing.assert_close(torch.einsum("bphe,hed->bpd", z, model.W_O[l]), cache[f"blocks.{l}.hook_attn_out"])
        m = cache[f"blocks.{l}.mlp.hook_in"]
        torch.testing.assert_close(m @ model.W_gate[l], cache[f"blocks.{l}.mlp.hook_pre"])
        torch.testing.assert_close(m @ model.W_in[l], cache[f"blocks.{l}.mlp.hook_pre_linear"])
        torch.testing.assert_close(cache[f"blocks.{l}.mlp.hook_post"] @ model.W_out[l], cache[f"blocks.{l}.hook_mlp_out"])


def test_biases_and_absent_weights():
    biased = build_model(tiny_config(attn_bias=True, mlp_bias=True, mlp_kind="relu"))
    assert biased.b_Q.shape == (2, 4, 8) and biased.b_O.shape == (2, 32) and biased.b_in.shape == (2, 48)
    assert biased.W_gate is None and biased.b_gate is None
    attn_only = build_model(tiny_config(mlp_kind="none"))
    assert attn_only.W_in is None and attn_only.W_out is None and attn_only.W_Q.shape == (2, 4, 32, 8)


def test_accumulated_bias_sums_output_biases():
    m = build_model(tiny_config(attn_bias=True, mlp_bias=True))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    b = [blk.attn.o.bias for blk in m.blocks]
    c = [getattr(blk.mlp, "out").bias for blk in m.blocks]
    torch.testing.assert_close(m.accumulated_bias(2), b[0] + c[0] + b[1] + c[1])
    torch.testing.assert_close(m.accumulated_bias(1, mlp_input=True), b[0] + c[0] + b[1])
    torch.testing.assert_close(m.accumulated_bias(0), torch.zeros(32))


def test_tl_keyword_arguments(model):
    bos = model.tokenizer.bos_token_id
    with_bos, without = model.to_tokens(TEXTS[0]), model.to_tokens(TEXTS[0], prepend_bos=False)
    assert with_bos[0, 0] == bos and torch.equal(with_bos[:, 1:], without)
    torch.testing.assert_close(model(TEXTS[0], prepend_bos=False), model(without))
    per_token = model(TEXTS[0], return_type="loss", loss_per_token=True)
    assert per_token.shape == (1, with_bos.shape[1] - 1)
    torch.testing.assert_close(per_token.mean(), model(TEXTS[0], return_type="loss"))
    assert model(TEXTS[0], return_type=None) is None
    torch.testing.assert_close(model(TEXTS[0], stop_at_layer=1), model.run_with_cache(TEXTS[0])[1]["blocks.1.hook_resid_pre"])
    with pytest.raises(ValueError, match=r"padding_side='middle' is invalid"):
        model(TEXTS, padding_side="middle")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(model, side):
    """Left padding shifts positions so every row computes what it computes alone, and the
    loss counts only real tokens."""
    logits = model(TEXTS, padding_side=side)
    tokens = model.to_tokens(TEXTS, padding_side=side)
    short = model.to_tokens(TEXTS[0]).shape[1]
    alone = model(TEXTS[0])
    rows = slice(tokens.shape[1] - short, None) if side == "left" else slice(0, short)
    torch.testing.assert_close(logits[0, rows], alone[0], **FLOAT32_REORDERED)
    torch.testing.assert_close(logits[1], model(TEXTS[1])[0], **FLOAT32_REORDERED)
    losses = torch.stack([model(t, return_type="loss", loss_per_token=True).sum() for t in TEXTS])
    n_predicted = sum(model.to_tokens(t).shape[1] - 1 for t in TEXTS)
    torch.testing.assert_close(model(TEXTS, padding_side=side, return_type="loss"), losses.sum() / n_predicted)


def test_tokenizer_without_bos_follows_transformer_lens(backend):
    """The paper's tokenizers have no BOS: no BOS by default, EOS when asked for one."""
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN)
    assert tok.bos_token_id is None
    m = build_model(tiny_config(d_vocab=len(tok), n_ctx=32), tokenizer=tok)
    assert not m.default_prepend_bos
    plain = m.to_tokens("Lily was happy.")
    assert torch.equal(plain[0], torch.tensor(tok.encode("Lily was happy.", add_special_tokens=False)))
    assert m.to_tokens("Lily was happy.", prepend_bos=True)[0, 0] == tok.eos_token_id
    assert m("Lily was happy.").shape == (1, plain.shape[1], m.cfg.d_vocab)


def test_generate_arguments(model):
    prompt = model.to_tokens("Lily was")
    greedy = model.generate(prompt, max_new_tokens=6, temperature=0, stop_at_eos=False)
    assert greedy.shape == (1, prompt.shape[1] + 6)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, top_k=1, seed=3, stop_at_eos=False), greedy)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, top_p=1e-6, seed=3, stop_at_eos=False), greedy)
    a = model.generate(prompt, max_new_tokens=6, seed=5, stop_at_eos=False)
    assert torch.equal(a, model.generate(prompt, max_new_tokens=6, seed=5, stop_at_eos=False))
    for bad, message in (({"temperature": -1.0}, "temperature=-1.0 is invalid: must be >= 0"),
                         ({"top_k": 0}, "top_k=0 is invalid"), ({"top_p": 1.5}, "top_p=1.5 is invalid"),
                         ({"max_new_tokens": -2}, "max_new_tokens=-2 is invalid")):
        with pytest.raises(ValueError, match=message):
            model.generate(prompt, **bad)
    assert isinstance(model.generate("Lily was", max_new_tokens=2, temperature=0), str)


def test_stop_at_eos_pads_finished_rows_with_eos(model):
    """A row that produced EOS continues with EOS; generation ends once every row has."""
    eos = model.tokenizer.eos_token_id
    forced = build_model(model.cfg, tokenizer=model.tokenizer)
    with torch.no_grad():
        forced.unembed.weight.zero_()
        forced.unembed.weight[eos] = 0  # all logits equal: argmax is token 0 = EOS for ours
    out = forced.generate(model.to_tokens(["Lily was", "The dog ran"]), max_new_tokens=5, temperature=0)
    assert out.shape[1] == model.to_tokens(["Lily was", "The dog ran"]).shape[1] + 1
    assert bool((out[:, -1] == eos).all())


def test_filter_logits_matches_a_sorted_reference():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    out = filter_logits(logits, top_p=0.6)
    for row in range(3):
        probs, order = logits[row].softmax(-1).sort(descending=True)
        keep = int((probs.cumsum(0) < 0.6).sum()) + 1  # smallest prefix reaching 0.6
        assert set(torch.isfinite(out[row]).nonzero()[:, 0].tolist()) == set(order[:keep].tolist())
    top3 = filter_logits(logits, top_k=3)
    assert bool((torch.isfinite(top3).sum(-1) == 3).all())


@pytest.mark.parametrize("kind", MLP_KINDS)
def test_every_shared_hook_matches_the_bridge(kind, tokens):
    """For every hook name our model and the bridge both have, the same activations
    (except attn.hook_attn_scores, which the bridge fires with the pattern: bridge.py)."""
    m = build_model(tiny_config(mlp_kind=kind))
    _, ours = m.run_with_cache(tokens)
    _, theirs = to_bridge(m).run_with_cache(tokens)
    shared = sorted((set(ours.keys()) & set(theirs.keys())) - {f"blocks.{l}.attn.hook_attn_scores" for l in range(2)})
    assert len(shared) >= (16 if kind == "none" else 30)
    for name in shared:
        torch.testing.assert_close(theirs[name], ours[name], **FLOAT32_REORDERED, msg=name)


def test_bridge_of_a_no_bos_model_tokenizes_like_the_model(backend):
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIAL_TOKEN, pad_token=SPECIAL_TOKEN)
    m = build_model(tiny_config(d_vocab=len(tok), n_ctx=64), tokenizer=tok)
    bridge = to_bridge(m)
    text = "Lily lost her red kite."
    assert torch.equal(bridge.to_tokens(text), m.to_tokens(text))
    torch.testing.assert_close(bridge(text), m(text), **FLOAT32_REORDERED)
