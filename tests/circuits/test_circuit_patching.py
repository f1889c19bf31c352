"""Batched patching grids equal TransformerLens' serial ``get_act_patch_*`` cell for cell, on
our model and on its bridge; eigen-component cells equal a slow serial reference; chunking
changes nothing; bad inputs are refused with one-line errors."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tl_patching
from conftest import FLOAT32_REORDERED, tiny_config

from bilinear_lens.circuits.patch_nodes import NODE_FAMILIES, eigen_family
from bilinear_lens.circuits.patching import GridResult, batched_activation_patch, patch_grid
from bilinear_lens.circuits.prompts import check_no_padding, prompt_tokens
from bilinear_lens.models.bridge import to_bridge
from bilinear_lens.models.model import BilinearTransformer

# The families TransformerLens has a get_act_patch_<name> for (the others are checked
# against generic_activation_patch or a serial reference below).
TL_KINDS = [k for k in NODE_FAMILIES if hasattr(tl_patching, f"get_act_patch_{k}")]
# Both paths run the same float64 operations on the same rows (batch stacking does not
# reorder a row's arithmetic beyond BLAS blocking): measured differences are <= 3e-17 on
# metrics of size ~0.3, so 1e-10 leaves 6 orders of magnitude for other kernels.
FLOAT64_TOL = dict(rtol=0.0, atol=1e-10)


@pytest.fixture
def float64_default():
    """TransformerLens allocates its result buffer in torch's default dtype: float64 here so
    its values are not rounded to float32 before the comparison."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _model(**overrides) -> BilinearTransformer:
    return BilinearTransformer(tiny_config(**{"dtype": "float64", "init_range": 0.1, **overrides})).eval()


def _prompts(batch: int = 2, pos: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.randint(0, 97, (batch, pos), generator=torch.Generator().manual_seed(1))
    corrupted = torch.randint(0, 97, (batch, pos), generator=torch.Generator().manual_seed(2))
    return clean, corrupted


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, 3] - logits[:, -1, 5]


@pytest.mark.parametrize("on_bridge", [True, False], ids=["bridge", "model"])
def test_every_tl_grid_matches_transformer_lens_per_example_with_baseline(on_bridge, float64_default):
    model = _model()
    model = to_bridge(model).eval() if on_bridge else model
    clean, corrupted = _prompts(pos=3)  # TransformerLens' serial loop is the slow side
    _, cache = model.run_with_cache(clean)
    assert len(TL_KINDS) == 14
    for kind in TL_KINDS:
        ref = getattr(tl_patching, f"get_act_patch_{kind}")(model, corrupted, cache, logit_diff, reduce="none", baseline=True)
        ours = batched_activation_patch(model, corrupted, cache, logit_diff, kind, reduce="none", baseline=True,
                                        max_batch=6, progress=False)
        assert isinstance(ours, GridResult) and ours.axis_names == [a for a in ref.axis_names], kind
        assert ours.values.shape == ref.values.shape, kind
        torch.testing.assert_close(ours.values, ref.values.to(ours.values.dtype), **FLOAT64_TOL, msg=kind)
        torch.testing.assert_close(ours.baseline, ref.baseline.to(ours.values.dtype), **FLOAT64_TOL)
        assert ours.values.abs().max() > 1e-3  # the grid is not trivially zero
        torch.testing.assert_close(ours.effect(), ref.effect().to(ours.values.dtype), **FLOAT64_TOL)


def test_scalar_and_mean_reductions_return_tensors_like_transformer_lens(float64_default):
    model = _model()
    clean, corrupted = _prompts()
    _, cache = model.run_with_cache(clean)
    mean_metric = lambda logits: logit_diff(logits).mean()  # noqa: E731
    ref = tl_patching.get_act_patch_attn_head_out_by_pos(model, corrupted, cache, mean_metric)
    ours = batched_activation_patch(model, corrupted, cache, mean_metric, "attn_head_out_by_pos", progress=False)
    assert isinstance(ours, torch.Tensor) and ours.shape == ref.shape == (2, 5, 4)
    torch.testing.assert_close(ours, ref, **FLOAT64_TOL)
    ref_mean = tl_patching.get_act_patch_resid_pre(model, corrupted, cache, logit_diff, reduce="mean")
    ours_mean = batched_activation_patch(model, corrupted, cache, logit_diff, "resid_pre", reduce="mean", progress=False)
    torch.testing.assert_close(ours_mean, ref_mean, **FLOAT64_TOL)


def test_float32_grids_match_transformer_lens_within_float32_reordering():
    model = BilinearTransformer(tiny_config(init_range=0.1)).eval()
    bridge = to_bridge(model).eval()
    clean, corrupted = _prompts()
    _, cache = bridge.run_with_cache(clean)
    for kind in ("resid_pre", "attn_head_out_by_pos", "attn_head_pattern_by_pos", "mlp_out"):
        ref = getattr(tl_patching, f"get_act_patch_{kind}")(bridge, corrupted, cache, logit_diff, reduce="none", baseline=True)
        ours = batched_activation_patch(bridge, corrupted, cache, logit_diff, kind, reduce="none", baseline=True,
                                        progress=False)
        torch.testing.assert_close(ours.values, ref.values, **FLOAT32_REORDERED)


def test_resid_post_matches_generic_activation_patch(float64_default):
    model = _model()
    clean, corrupted = _prompts()
    _, cache = model.run_with_cache(clean)
    ref = tl_patching.generic_activation_patch(
        model, corrupted, cache, logit_diff, tl_patching.layer_pos_patch_setter, "resid_post",
        index_axis_names=("layer", "pos"), reduce="none")
    ours = batched_activation_patch(model, corrupted, cache, logit_diff, "resid_post", reduce="none", progress=False)
    torch.testing.assert_close(ours.values, ref.values, **FLOAT64_TOL)


def _serial(model, corrupted, cache, hook_name, setter):
    """One forward per cell: the slow reference (``setter(x_corrupted, x_clean)`` -> patched)."""
    clean_act = cache[hook_name]
    with torch.no_grad():
        return logit_diff(model.run_with_hooks(corrupted, fwd_hooks=[(hook_name, lambda x, hook: setter(x, clean_act))]))


@pytest.mark.parametrize("on_bridge", [False, True], ids=["model", "bridge"])
def test_embed_and_mlp_in_grids_equal_serial_patching(on_bridge):
    model = _model()
    model = to_bridge(model).eval() if on_bridge else model
    clean, corrupted = _prompts()
    _, cache = model.run_with_cache(clean)

    def at(pos):
        def setter(x, c):
            x = x.clone()
            x[:, pos] = c[:, pos]
            return x
        return setter

    embed = batched_activation_patch(model, corrupted, cache, logit_diff, "embed", reduce="none", progress=False)
    mlp_in = batched_activation_patch(model, corrupted, cache, logit_diff, "mlp_in", reduce="none", progress=False)
    for pos in range(5):
        torch.testing.assert_close(embed.values[pos], _serial(model, corrupted, cache, "hook_embed", at(pos)), **FLOAT64_TOL)
        for layer in range(2):
            ref = _serial(model, corrupted, cache, f"blocks.{layer}.mlp.hook_in", at(pos))
            torch.testing.assert_close(mlp_in.values[layer, pos], ref, **FLOAT64_TOL)


@pytest.mark.parametrize("on_bridge", [False, True], ids=["model", "bridge"])
def test_eigen_component_cells_equal_serial_coefficient_patching(on_bridge):
    model = _model()
    target = to_bridge(model).eval() if on_bridge else model
    clean, corrupted = _prompts()
    _, cache = target.run_with_cache(clean)
    u = model.W_U[:, 3] - model.W_U[:, 5]
    family = eigen_family(target, 1, u, k=4)
    grid = batched_activation_patch(target, corrupted, cache, logit_diff, family, reduce="none", max_batch=5,
                                    progress=False)
    assert grid.axis_names == ["component", "pos"] and grid.values.shape == (4, 5, 2)
    vectors = family.eigenvectors
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(4, dtype=vectors.dtype), rtol=0, atol=1e-12)
    for i in range(4):
        v = vectors[:, i]
        for pos in range(5):
            def setter(x, c, v=v, pos=pos):
                x = x.clone()
                x[:, pos] += ((c[:, pos] - x[:, pos]) @ v)[:, None] * v
                return x
            ref = _serial(target, corrupted, cache, "blocks.1.mlp.hook_in", setter)
            torch.testing.assert_close(grid.values[i, pos], ref, **FLOAT64_TOL)


def test_eigen_family_refuses_a_layer_that_is_not_bilinear():
    model = _model(mlp_kind="swiglu")
    with pytest.raises(ValueError, match="layer 0 has a 'swiglu' MLP"):
        eigen_family(model, 0, torch.ones(32, dtype=torch.float64), k=2)
    with pytest.raises(ValueError, match=r"k=0 is invalid: must be an integer in \[1, 32\]"):
        eigen_family(_model(), 0, torch.ones(32, dtype=torch.float64), k=0)


def test_chunk_size_does_not_change_values():
    model = _model()
    clean, corrupted = _prompts(batch=3)
    _, cache = model.run_with_cache(clean)
    runs = [batched_activation_patch(model, corrupted, cache, logit_diff, "attn_head_v_by_pos", reduce="none",
                                     max_batch=m, progress=False).values for m in (1, 7, 10_000)]
    torch.testing.assert_close(runs[0], runs[1], **FLOAT64_TOL)
    torch.testing.assert_close(runs[0], runs[2], **FLOAT64_TOL)


def test_patch_grid_recovery_is_one_where_the_patch_restores_the_clean_logits_and_ci_brackets_the_mean():
    model = _model()
    clean, corrupted = _prompts(batch=4)
    grid = patch_grid(model, clean, corrupted, logit_diff, "resid_post", progress=False)
    with torch.no_grad():
        clean_metric = logit_diff(model(clean))
        corrupted_metric = logit_diff(model(corrupted))
    torch.testing.assert_close(grid.clean_baseline, clean_metric, **FLOAT64_TOL)
    torch.testing.assert_close(grid.baseline, corrupted_metric, **FLOAT64_TOL)
    # The last layer's residual at the last position is all the last logits read.
    torch.testing.assert_close(grid.recovery()[-1, -1], torch.ones(4, dtype=torch.float64), **FLOAT64_TOL)
    torch.testing.assert_close(grid.effect()[-1, -1], clean_metric - corrupted_metric, **FLOAT64_TOL)
    low, high = grid.bootstrap_ci(n_resamples=200)
    mean = grid.mean()
    assert bool((low <= mean + 1e-12).all() and (mean <= high + 1e-12).all())


def test_model_config_gains_only_read_only_tl_attributes():
    cfg = tiny_config()
    assert cfg.device is None and cfg.n_key_value_heads is None
    assert "device" not in cfg.to_dict() and type(cfg).from_dict(cfg.to_dict()) == cfg


def test_bad_inputs_are_refused_with_one_line_errors():
    model = _model()
    clean, corrupted = _prompts()
    _, cache = model.run_with_cache(clean)
    with pytest.raises(ValueError, match=r"kind='resid' is invalid: allowed \['embed', 'resid_pre'"):
        batched_activation_patch(model, corrupted, cache, logit_diff, "resid")
    with pytest.raises(ValueError, match="max_batch=0 is invalid: must be an integer >= 1"):
        batched_activation_patch(model, corrupted, cache, logit_diff, "resid_pre", reduce="none", max_batch=0)
    with pytest.raises(ValueError, match=r"reduce='all' is invalid: allowed \['scalar', 'mean', 'none'\]"):
        batched_activation_patch(model, corrupted, cache, logit_diff, "resid_pre", reduce="all")
    with pytest.raises(ValueError, match=r"must return a scalar under reduce='scalar', got shape \(2,\)"):
        batched_activation_patch(model, corrupted, cache, logit_diff, "resid_pre", progress=False)
    with pytest.raises(ValueError, match=r"the clean cache has activations \(2, 5, 32\) but corrupted_tokens is \(2, 4\)"):
        batched_activation_patch(model, corrupted[:, :4], cache, logit_diff, "resid_pre", reduce="none")
    with pytest.raises(ValueError, match=r"clean and corrupted prompts have different lengths \(5 and 4 tokens\)"):
        patch_grid(model, clean, corrupted[:, :4], logit_diff)
    with pytest.raises(ValueError, match="clean has 2 prompts and corrupted 1: give them in pairs"):
        patch_grid(model, clean, corrupted[:1], logit_diff)
    with pytest.raises(ValueError, match="attention_mask has padding"):
        check_no_padding(torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match=r"kind='mlp_in_eigen' needs a layer and a direction"):
        patch_grid(model, clean, corrupted, logit_diff, "mlp_in_eigen")


def test_texts_of_different_token_lengths_are_refused_not_padded(small_tokenizer):
    tok = small_tokenizer
    model = BilinearTransformer(tiny_config(d_vocab=len(tok)), tokenizer=tok).eval()
    same = prompt_tokens(model, ["the cat", "the cat"], "clean")
    assert same.shape[0] == 2
    with pytest.raises(ValueError, match=r"corrupted tokenize to different lengths \[\d+, \d+\]: patching needs prompts"):
        prompt_tokens(model, ["the cat", "the big happy dog ran home"], "corrupted")


@pytest.mark.parametrize("on", ["model", "bridge"])
def test_patching_benchmark_runs_at_toy_size_and_prints_ratio_and_difference(on, capsys):
    from benchmarks import patching as bench

    code = bench.main(["--n-layers", "2", "--pos", "4", "--d-model", "16", "--n-heads", "2", "--d-vocab", "32",
                       "--max-batch", "5", "--on", on])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "= 16 cells" in out and "ratio (serial/batched):" in out
    assert float(out.split("max |difference|: ")[1].split()[0]) <= bench.DISAGREE
