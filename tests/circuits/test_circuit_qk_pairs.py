"""QK pair attribution: (query writer x key writer) terms sum to the pre-softmax score."""

import math

import pytest
import torch

from bilinear_lens import to_bridge
from bilinear_lens.circuits.qk_pairs import qk_pair_attribution
from fixtures.writer_models import TOKENS, random_model

# float64 sums of ~100 bilinear terms of O(1): rounding ~1e-14, 1e-10 leaves a wide margin.
ATOL = 1e-10

CONFIGS = [
    dict(),  # rotary, RMSPre
    dict(normalization_type="LN", attn_bias=True, mlp_bias=True),
    dict(normalization_type="LNPre", positional_embedding_type="standard"),
    dict(normalization_type=None, attn_bias=True),
    dict(normalization_type="RMS", n_layers=3),
]


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("layer, head, p, s", [(0, 1, 6, 2), (1, 3, 5, 5), (1, 0, 6, 0)])
def test_qk_pairs_sum_to_the_pre_softmax_score(overrides, layer, head, p, s):
    model = random_model(**overrides)
    qk = qk_pair_attribution(model, TOKENS, layer, head, query_position=p, key_position=s)
    _, cache = model.run_with_cache(TOKENS)
    score = float(cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, p, s])
    assert abs(qk.total - score) < ATOL
    assert abs(qk.observed - score) < ATOL  # the same forward, another hook set: rounding only
    triples = qk.pair_wise_contributors()
    assert len(triples) == qk.matrix.numel()
    assert abs(sum(v for _, _, v in triples) - score) < ATOL
    assert abs(triples[0][2]) == float(qk.matrix.abs().max())
    assert ("q bias" in qk.query_labels) == bool(overrides.get("attn_bias"))


def test_one_pair_term_against_the_slow_formula():
    """embed x embed at layer 0 with rotary: (R_p W_Q^T e_p/s_p) . (R_s W_K^T e_s/s_s) / sqrt(d)."""
    model = random_model()
    p, s, h = 5, 2, 1
    qk = qk_pair_attribution(model, TOKENS, 0, h, query_position=p, key_position=s)
    _, cache = model.run_with_cache(TOKENS)
    scale = cache["blocks.0.ln1.hook_scale"][0, :, 0]
    emb = model.W_E.detach()[TOKENS[0]]
    attn = model.blocks[0].attn
    q = (emb[p] / scale[p]) @ attn.W_Q[h].detach()
    k = (emb[s] / scale[s]) @ attn.W_K[h].detach()
    cos, sin = attn.rotary.cos.double(), attn.rotary.sin.double()

    def rot(v, i):
        half = v.shape[-1] // 2
        return v * cos[i] + torch.cat([-v[half:], v[:half]]) * sin[i]

    expected = float(rot(q, p) @ rot(k, s)) / math.sqrt(model.cfg.d_head)
    assert abs(float(qk.matrix[0, 0]) - expected) < ATOL


def test_default_key_is_the_most_attended_and_the_bridge_agrees():
    model = random_model(normalization_type="LN")
    qk = qk_pair_attribution(model, TOKENS, 1, 2)
    _, cache = model.run_with_cache(TOKENS)
    assert qk.key_position == int(cache["blocks.1.attn.hook_pattern"][0, 2, 6].argmax())
    bridged = qk_pair_attribution(to_bridge(model), TOKENS, 1, 2)
    assert bridged.observed is None and bridged.key_position == qk.key_position
    torch.testing.assert_close(bridged.matrix, qk.matrix, rtol=0, atol=ATOL)


def test_bad_inputs_name_the_argument():
    model = random_model()
    with pytest.raises(ValueError, match=r"^query_position=7 is out of range for a prompt of 7 tokens"):
        qk_pair_attribution(model, TOKENS, 0, 0, query_position=7)
    with pytest.raises(ValueError, match=r"^key_position=5 is after query_position=3: causal attention masks it"):
        qk_pair_attribution(model, TOKENS, 0, 0, query_position=3, key_position=5)
    with pytest.raises(ValueError, match=r"^head=4 is out of range \[0, 4\)"):
        qk_pair_attribution(model, TOKENS, 0, 4)
    with pytest.raises(ValueError, match=r"^layer 2 is out of range"):
        qk_pair_attribution(model, TOKENS, 2, 0)
