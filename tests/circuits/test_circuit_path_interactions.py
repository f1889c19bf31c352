"""Weight-based path interactions: Q(u) projected onto embedding, virtual-token and MLP paths."""

import pytest
import torch

from bilinear_lens import build_model
from bilinear_lens.weights.layer_eigen import normalized_embeddings
from bilinear_lens.circuits.pairs import mlp_pair_decomposition
from bilinear_lens.circuits.path_interactions import path_interactions
from bilinear_lens.weights.directions import resolve_direction
from bilinear_lens.weights.tensor import interaction_matrix
from conftest import tiny_config
from fixtures.writer_models import TOKENS, random_model

# float64 products of O(1) vectors and matrices: rounding ~1e-14; 1e-10 is a wide margin.
EXACT = dict(rtol=0, atol=1e-10)
SOURCE = [0, 0, 1, 1, 2, 3, 2]  # query p attends only to SOURCE[p] (causal: SOURCE[p] <= p)


def one_hot_pattern(pattern, hook):
    forced = torch.zeros_like(pattern)
    forced[:, :, torch.arange(len(SOURCE)), torch.tensor(SOURCE)] = 1.0
    return forced


@pytest.mark.parametrize("overrides, frozen_scale", [
    (dict(normalization_type=None), False),
    (dict(normalization_type="RMSPre"), True),
    (dict(normalization_type="LN", attn_bias=True), True),
])
def test_one_hot_attention_block_equals_the_hook_based_pair_term(overrides, frozen_scale):
    """Layer 0's attention forced one-hot: head h's writer at p is the virtual token of the
    source token, so the (embedding, head) block at the actual tokens is the pair term."""
    model = random_model(**overrides)
    p, layer = 6, 1
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", one_hot_pattern)]):
        pairs = mlp_pair_decomposition(model, TOKENS, layer, 7, position=p)
        assert abs(pairs.total - pairs.observed) < 1e-10
    paths = path_interactions(model, layer, 7, scale=pairs.scale if frozen_scale else None)
    t_p, t_s = int(TOKENS[0, p]), int(TOKENS[0, SOURCE[p]])
    for h in range(model.cfg.n_heads):
        weight_based = paths.block("embed", f"L0H{h}", [t_p], [t_s])[0, 0]
        hook_based = pairs.matrix[pairs.labels.index("embed"), pairs.labels.index(f"L0H{h}")]
        assert abs(float(weight_based - hook_based)) < 1e-10


def test_embed_path_is_normalized_embeddings_and_blocks_are_the_slow_formula():
    model = random_model(normalization_type="LN", n_layers=3)
    paths = path_interactions(model, 2, (3, 4))
    # the bias-free linear part: normalized_embeddings minus ln2's bias
    expected = normalized_embeddings(model, 2) - model.blocks[2].ln2.bias.detach()
    torch.testing.assert_close(paths.bases["embed"], expected, **EXACT)
    Q = interaction_matrix(model.blocks[2].mlp, resolve_direction(model, (3, 4)))
    a, b = paths.bases["L1H2"][[5, 9]], paths.bases["MLP0"][[1, 2, 3]]
    torch.testing.assert_close(paths.block("L1H2", "MLP0", [5, 9], [1, 2, 3]), a @ Q @ b.T, **EXACT)
    assert paths.names == ["embed"] + [f"L{l}H{h}" for l in range(3) for h in range(4)] + ["MLP0", "MLP1"]


def test_composition_scores_are_symmetric_bounded_and_rotation_invariant():
    model = random_model(normalization_type=None)
    paths = path_interactions(model, 1, 7)
    C = paths.composition
    torch.testing.assert_close(C, C.T, rtol=0, atol=0)
    assert bool((C >= 0).all()) and bool((C <= 1 + 1e-12).all())
    # slow reference for one entry: |P_a Q P_b^T|_F / (|P_a| |P_b| |Q|)
    Q = paths.Q
    OV = model.blocks[0].attn.W_V[1].detach() @ model.blocks[0].attn.W_O[1].detach()
    W_out = model.blocks[0].mlp.W_out.detach()
    expected = (OV @ Q @ W_out.T).norm() / (OV.norm() * W_out.norm() * Q.norm())
    i, j = paths.names.index("L0H1"), paths.names.index("MLP0")
    assert abs(float(C[i, j] - expected)) < 1e-12
    assert paths.top_composition(3)[0][2] == float(C[torch.triu_indices(len(C), len(C)).unbind()].max())


def test_bad_inputs():
    model = random_model()
    paths = path_interactions(model, 1, 7)
    with pytest.raises(ValueError, match=r"^path 'L5H0' is not one of"):
        paths.block("embed", "L5H0")
    with pytest.raises(ValueError, match=r"^tokens \[97\] are out of range \[0, 97\)"):
        paths.block("embed", "embed", [97])
    with pytest.raises(ValueError, match=r"^scale must be positive"):
        path_interactions(model, 1, 7, scale=-1.0)
    with pytest.raises(ValueError, match=r"^layer 1 has a 'swiglu' MLP"):
        path_interactions(build_model(tiny_config(mlp_kind="swiglu")), 1, 7)
