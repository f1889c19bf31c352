"""Attribution patching: ``atp`` is TransformerLens' node attribution patch; the path rules are
exact exactly where their polynomial degree says (two-point for one bilinear MLP, k-point
Gauss-Legendre for degree 2k-1 with patterns and scales frozen); the remainder of one
bilinear MLP is ``delta^T Q(u) delta``; SwiGLU stays inexact."""

from __future__ import annotations

import pytest
import torch
from conftest import FLOAT32_REORDERED, tiny_config
from transformer_lens.tools.analysis.attribution_patching import attribution_patch

from bilinear_lens.circuits.attribution_patching import attribution_patching, parse_method, path_rule
from bilinear_lens.circuits.freezing import freeze_hooks, frozen_hook_names
from bilinear_lens.circuits.patching import patch_grid
from bilinear_lens.models.bridge import to_bridge
from bilinear_lens.models.model import BilinearTransformer
from bilinear_lens.weights.tensor import interaction_matrix

# Exact identities evaluated in float64 through two different computations (a patched
# forward vs gradients at quadrature points): measured gaps are <= 2e-15 on effects of
# size 0.2-2, so 1e-9 (the bound) is a 5e5x margin and still far below the
# O(1e-3..1) errors of the inexact rules it separates them from.
EXACT = dict(rtol=0.0, atol=1e-9)
A, B = 3, 5


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, A] - logits[:, -1, B]


def _model(**overrides) -> BilinearTransformer:
    # init_range 0.2: large enough that the MLPs' quadratic terms are O(1) (clear gaps).
    return BilinearTransformer(tiny_config(**{"dtype": "float64", "init_range": 0.2, **overrides})).eval()


def _prompts(batch: int = 2, pos: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, 97, (batch, pos), generator=torch.Generator().manual_seed(1))
    corrupted = torch.randint(0, 97, (batch, pos), generator=torch.Generator().manual_seed(2))
    return clean, corrupted


def _tl_node_scores(model, clean, corrupted):
    """TransformerLens' node scores laid out as our embed / head / mlp_out grids."""
    ref = attribution_patch(model, clean, corrupted, lambda logits: logit_diff(logits).sum())
    n_layers, n_heads, pos = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1]
    embed, heads, mlps = torch.zeros(pos), torch.zeros(n_layers, pos, n_heads), torch.zeros(n_layers, pos)
    for node, score in ref.node_scores.items():
        if node.kind == "embed":
            embed[node.position] = score
        elif node.kind == "attn_head_out":
            heads[node.layer, node.position, node.head] = score
        else:
            mlps[node.layer, node.position] = score
    return embed.double(), heads.double(), mlps.double()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_atp_equals_transformer_lens_node_attribution_patch_with_its_sign(dtype):
    model = _model(dtype=dtype)
    bridge = to_bridge(model).eval()
    clean, corrupted = _prompts()
    embed, heads, mlps = _tl_node_scores(bridge, clean, corrupted)
    assert heads.abs().max() > 1e-2
    for target in (bridge, model):
        ours = [attribution_patching(target, clean, corrupted, logit_diff, kind, progress=False).mean().double()
                for kind in ("embed", "attn_head_out_by_pos", "mlp_out")]
        for mine, ref in zip(ours, (embed, heads, mlps)):
            # float64: the 1e-6 (measured <= 3e-17: same operations, batch of 2 vs
            # TransformerLens' one example at a time). float32: that reordering is a few ulps
            # through two layers (measured 3e-6 on scores ~0.3), FLOAT32_REORDERED's bound.
            tol = dict(rtol=0.0, atol=1e-6) if dtype == "float64" else FLOAT32_REORDERED
            torch.testing.assert_close(mine, ref, **tol)


@pytest.mark.parametrize("on_bridge", [False, True], ids=["model", "bridge"])
def test_two_point_is_exact_at_the_last_mlp_input_and_atp_misses_exactly_the_remainder(on_bridge):
    model = _model(normalization_type=None)
    target = to_bridge(model).eval() if on_bridge else model
    clean, corrupted = _prompts()
    exact = attribution_patching(target, clean, corrupted, logit_diff, "mlp_in", "exact", progress=False)
    two = attribution_patching(target, clean, corrupted, logit_diff, "mlp_in", "two_point", max_batch=3, progress=False)
    atp = attribution_patching(target, clean, corrupted, logit_diff, "mlp_in", "atp", progress=False)
    last = model.cfg.n_layers - 1
    # After the last MLP input: the MLP (a quadratic form) then linear maps: the trapezoid rule is exact.
    torch.testing.assert_close(two.scores[last], exact.scores[last], **EXACT)
    assert (atp.scores[last] - exact.scores[last]).abs().max() > 1e-2
    torch.testing.assert_close(exact.scores[last] - atp.scores[last], atp.remainder[last], **EXACT)
    # An earlier MLP feeds attention (softmax) and another MLP: two-point is only approximate there.
    assert (two.scores[0] - exact.scores[0]).abs().max() > 1e-7


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_single_mlp_remainder_equals_delta_q_delta_from_the_weights(mlp_bias):
    model = _model(normalization_type=None, n_layers=1, mlp_bias=mlp_bias)
    clean, corrupted = _prompts()
    atp = attribution_patching(model, clean, corrupted, logit_diff, "mlp_in", "atp", progress=False)
    exact = attribution_patching(model, clean, corrupted, logit_diff, "mlp_in", "exact", progress=False)
    _, clean_cache = model.run_with_cache(clean)
    _, corrupted_cache = model.run_with_cache(corrupted)
    delta = (clean_cache["blocks.0.mlp.hook_in"] - corrupted_cache["blocks.0.mlp.hook_in"])[:, -1]  # [batch, d]
    u = model.W_U[:, A] - model.W_U[:, B]  # the metric reads the MLP output along u, linearly
    Q = interaction_matrix(model.blocks[0].mlp, u)  # biases add no quadratic term
    expected = torch.einsum("bi,ij,bj->b", delta, Q, delta)
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(atp.remainder[0, -1], expected, rtol=0.0, atol=1e-10)
    torch.testing.assert_close(exact.scores[0, -1] - atp.scores[0, -1], expected, rtol=0.0, atol=1e-10)
    # Earlier positions do not reach the last position's logits through a 1-layer MLP.
    torch.testing.assert_close(atp.remainder[0, :-1], torch.zeros_like(atp.remainder[0, :-1]), rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("on_bridge", [False, True], ids=["model", "bridge"])
def test_gauss_legendre_2_at_the_embedding_is_exact_with_patterns_and_scales_frozen(on_bridge):
    # Two layers, RMSPre with its scales frozen and attention patterns frozen: everything
    # but the two bilinear MLPs is linear, so the logit is a polynomial of degree 2^2 = 4 in
    # the embedding along the path, its derivative (the integrand g(alpha) . D) of degree 3,
    # and 2-point Gauss-Legendre integrates degree <= 2k - 1 = 3 exactly.
    model = _model(n_layers=2)
    target = to_bridge(model).eval() if on_bridge else model
    clean, corrupted = _prompts()
    frozen = dict(freeze_patterns=True, freeze_norm_scales=True, progress=False)
    exact = attribution_patching(target, clean, corrupted, logit_diff, "embed", "exact", **frozen)
    gl2 = attribution_patching(target, clean, corrupted, logit_diff, "embed", ("gauss_legendre", 2), **frozen)
    atp = attribution_patching(target, clean, corrupted, logit_diff, "embed", "atp", **frozen)
    gl1 = attribution_patching(target, clean, corrupted, logit_diff, "embed", "gauss_legendre:1", **frozen)
    torch.testing.assert_close(gl2.scores, exact.scores, **EXACT)
    assert (atp.scores - exact.scores).abs().max() > 1e-2
    assert (gl1.scores - exact.scores).abs().max() > 1e-7  # the midpoint is exact only to degree 2
    unfrozen = attribution_patching(target, clean, corrupted, logit_diff, "embed", "exact", progress=False)
    assert (unfrozen.scores - exact.scores).abs().max() > 1e-2  # freezing is a real change of the question
    torch.testing.assert_close(exact.metric_corrupted, unfrozen.metric_corrupted, **EXACT)  # frozen at corrupted


@pytest.mark.parametrize(("n_layers", "exact_k", "short_k"), [(1, 1, None), (3, 4, 2)])
def test_gauss_legendre_points_needed_follow_the_degree_two_to_the_n_layers(n_layers, exact_k, short_k):
    # Frozen, n bilinear MLPs: degree 2^n in the path, exact from k = 2^(n-1) points.
    model = _model(n_layers=n_layers)
    clean, corrupted = _prompts()
    frozen = dict(freeze_patterns=True, freeze_norm_scales=True, progress=False, freeze_at="clean")
    exact = attribution_patching(model, clean, corrupted, logit_diff, "embed", "exact", **frozen)
    enough = attribution_patching(model, clean, corrupted, logit_diff, "embed", f"gauss_legendre:{exact_k}", **frozen)
    torch.testing.assert_close(enough.scores, exact.scores, **EXACT)
    if short_k is not None:
        short = attribution_patching(model, clean, corrupted, logit_diff, "embed", f"gauss_legendre:{short_k}", **frozen)
        assert (short.scores - exact.scores).abs().max() > 1e-7


def test_swiglu_stays_inexact_and_has_no_bilinear_remainder():
    model = _model(normalization_type=None, mlp_kind="swiglu")
    clean, corrupted = _prompts()
    exact = attribution_patching(model, clean, corrupted, logit_diff, "mlp_in", "exact", progress=False)
    two = attribution_patching(model, clean, corrupted, logit_diff, "mlp_in", "two_point", progress=False)
    gl2 = attribution_patching(model, clean, corrupted, logit_diff, "mlp_in", "gauss_legendre:2", progress=False)
    assert (two.scores[-1] - exact.scores[-1]).abs().max() > 1e-7
    assert (gl2.scores[-1] - exact.scores[-1]).abs().max() > 1e-7
    assert two.remainder is None


def test_exact_method_is_the_grid_effect_and_float32_path_rules_run():
    model = _model()
    clean, corrupted = _prompts()
    exact = attribution_patching(model, clean, corrupted, logit_diff, "attn_head_out_by_pos", "exact", progress=False)
    grid = patch_grid(model, clean, corrupted, logit_diff, "attn_head_out_by_pos", progress=False)
    torch.testing.assert_close(exact.scores, grid.effect(), rtol=0.0, atol=1e-12)
    model32 = _model(dtype="float32", normalization_type=None)
    two32 = attribution_patching(model32, clean, corrupted, logit_diff, "mlp_in", "two_point", progress=False)
    ex32 = attribution_patching(model32, clean, corrupted, logit_diff, "mlp_in", "exact", progress=False)
    torch.testing.assert_close(two32.scores[-1], ex32.scores[-1], **FLOAT32_REORDERED)


def test_freeze_hooks_at_the_run_itself_change_nothing_even_on_stacked_copies():
    model = _model()
    tokens = _prompts()[0]
    logits, cache = model.run_with_cache(tokens)
    hooks = freeze_hooks(model, cache)
    assert [n for n, _ in hooks] == frozen_hook_names(model) and len(hooks) == 2 * 3 + 1
    with torch.no_grad():
        frozen = model.run_with_hooks(tokens.repeat(3, 1), fwd_hooks=hooks)
    torch.testing.assert_close(frozen, logits.repeat(3, 1, 1), rtol=0.0, atol=1e-12)
    assert frozen_hook_names(_model(normalization_type=None), patterns=False) == []
    with pytest.raises(ValueError, match=r"cannot freeze blocks.0.ln1.hook_scale: the forward has shape \(3, 5, 1\), the cached value \(2, 5, 1\)"):
        model.run_with_hooks(tokens[:1].repeat(3, 1), fwd_hooks=hooks)


def test_method_parsing_and_quadrature_rules():
    assert parse_method(("gauss_legendre", 2)) == parse_method("gauss_legendre:2") == ("gauss_legendre", 2)
    assert parse_method("atp") == ("atp", 0)
    alphas, weights = path_rule("gauss_legendre", 3)
    # k-point Gauss-Legendre on [0, 1] integrates t^j exactly for j <= 2k - 1 = 5.
    for j in range(6):
        assert abs(sum(w * a**j for a, w in zip(alphas, weights)) - 1 / (j + 1)) < 1e-15
    for bad in ("eap", "gauss_legendre:x", ("gauss_legendre", 0), ("atp", 2)):
        with pytest.raises(ValueError, match="is invalid"):
            parse_method(bad)
    model = _model()
    clean, corrupted = _prompts()
    with pytest.raises(ValueError, match=r"freeze_at='both' is invalid: allowed \['corrupted', 'clean'\]"):
        attribution_patching(model, clean, corrupted, logit_diff, freeze_at="both")
    with pytest.raises(ValueError, match=r"metric must return a \[batch\] tensor of length 2, got shape \(\)"):
        attribution_patching(model, clean, corrupted, lambda logits: logit_diff(logits).sum(), progress=False)
    with pytest.raises(ValueError, match="kind='attn_head_pattern_by_pos' patches the attention patterns that freeze_patterns"):
        attribution_patching(model, clean, corrupted, logit_diff, "attn_head_pattern_by_pos", freeze_patterns=True)
    with pytest.raises(ValueError, match=r"clean and corrupted prompts have different lengths \(5 and 3 tokens\)"):
        attribution_patching(model, clean, corrupted[:, :3], logit_diff)


@pytest.mark.parametrize("kind", ["attn_head_pattern_all_pos", "attn_head_q_all_pos", "resid_mid"])
def test_path_rules_run_on_every_family_and_converge_to_exact_with_more_points(kind):
    # Without freezing, softmax and norms make nothing polynomial, but Gauss-Legendre still
    # converges to the exact effect on these smooth paths (measured on resid_mid: 8 points
    # 4e-2, 16: 5e-4, 32: 1e-7, 64: 3e-15, the norm's input dipping to a third of its length).
    model = _model(init_range=0.1)
    clean, corrupted = _prompts()
    exact = attribution_patching(model, clean, corrupted, logit_diff, kind, "exact", progress=False)
    atp = attribution_patching(model, clean, corrupted, logit_diff, kind, "atp", progress=False)
    gl64 = attribution_patching(model, clean, corrupted, logit_diff, kind, "gauss_legendre:64", progress=False)
    assert gl64.scores.shape == exact.scores.shape == atp.scores.shape
    assert (gl64.scores - exact.scores).abs().max() < 1e-9 < 1e-3 < (atp.scores - exact.scores).abs().max()
