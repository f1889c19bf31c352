"""Ablation and patching hooks: exact identities on tiny float64 models, bridge parity, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.testing import assert_close

from bilinear_lens.activations.ablation import (
    NeuronTable,
    ablate_direction,
    ablate_eigencomponents,
    ablate_neurons,
    ablation_sweep,
    direction_ablation_hook,
    eigen_ablation_hooks,
    logit_diff_metric,
    logit_metric,
    loss_metric,
    neuron_ablation_hook,
    patch_neurons,
)
from bilinear_lens.models.bridge import to_bridge
from bilinear_lens.commands import ablate as ablate_cmd
from bilinear_lens.weights.eigen import eigendecompose, low_rank_output
from bilinear_lens.models.hook_names import UnknownHookError
from bilinear_lens.models.model import build_model, next_token_loss
from bilinear_lens.weights.tensor import interaction_matrix
from conftest import tiny_config

EXACT = dict(rtol=0.0, atol=1e-12)


def f64_model(**overrides):
    return build_model(tiny_config(dtype="float64", **overrides)).eval()


def randomize_mlp_biases(model, layer: int = 0) -> None:
    """Biases are initialised to zero; make them nonzero so tests see them."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for linear in ("gate", "in", "out"):
            module = getattr(model.blocks[layer].mlp, linear, None)
            if module is not None and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen, dtype=module.bias.dtype))


def capture(model, tokens, names, fwd_hooks=()):
    """Activations at ``names`` after ``fwd_hooks`` ran (hooks on one point run in order)."""
    store = {}

    def save(act, hook):
        store[hook.name] = act.detach().clone()

    hooks = list(fwd_hooks) + [(name, save) for name in names]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
    return store


def zero_out(activation, hook):
    return torch.zeros_like(activation)


@pytest.fixture
def other_tokens() -> torch.Tensor:
    return torch.randint(0, 97, (4, 11), generator=torch.Generator().manual_seed(5))


# ---- zero ablation identities -------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, hook",
    [("bilinear", "hook_post"), ("bilinear", "hook_pre"), ("bilinear", "hook_pre_linear"),
     ("swiglu", "hook_pre"), ("relu", "hook_post"), ("relu", "hook_pre"), ("gelu", "hook_pre")],
)
def test_zero_ablating_every_neuron_removes_the_mlp(kind, hook, tokens):
    model = f64_model(mlp_kind=kind)
    with torch.no_grad():
        with ablate_neurons(model, 1, range(model.cfg.d_mlp), hook=hook):
            ablated = model(tokens)
        without_mlp = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", zero_out)])
        clean = model(tokens)
    assert_close(ablated, without_mlp, **EXACT)
    assert (ablated - clean).abs().max() > 1e-6  # the MLP mattered


def test_zero_ablating_every_neuron_leaves_the_output_bias():
    model = f64_model(mlp_kind="bilinear", mlp_bias=True)
    randomize_mlp_biases(model, layer=0)
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    b_out = model.blocks[0].mlp.b_out.detach()
    with torch.no_grad():
        with ablate_neurons(model, 0, torch.ones(model.cfg.d_mlp, dtype=torch.bool)):
            ablated = model(tokens)
        bias_only = lambda y, hook: b_out.expand_as(y)  # noqa: E731
        only_bias = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", bias_only)])
        no_mlp = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_mlp_out", zero_out)])
    assert_close(ablated, only_bias, **EXACT)
    assert (ablated - no_mlp).abs().max() > 1e-6  # b_out really remains


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_neuron_with_zero_outgoing_weight_changes_nothing(method, tokens, other_tokens):
    model = f64_model(mlp_kind="bilinear")
    with torch.no_grad():
        model.blocks[0].mlp.out.weight[:, 7] = 0.0  # row 7 of W_out [d_mlp, d_model]
        clean = model(tokens)
        with ablate_neurons(model, 0, [7, 7], method=method, reference=other_tokens):
            ablated = model(tokens)
        with ablate_neurons(model, 0, [7, 8], method=method, reference=other_tokens):
            with_live_neuron = model(tokens)
    assert_close(ablated, clean, rtol=0.0, atol=0.0)
    assert (with_live_neuron - clean).abs().max() > 1e-8


# ---- mean / resample ----------------------------------------------------------------------


@pytest.mark.parametrize("kind, hook", [("relu", "hook_post"), ("relu", "hook_pre"), ("linear", "hook_post")])
def test_mean_ablating_a_constant_neuron_changes_nothing(kind, hook, tokens):
    model = f64_model(mlp_kind=kind, mlp_bias=True)
    randomize_mlp_biases(model, layer=0)
    with torch.no_grad():
        mlp = model.blocks[0].mlp
        getattr(mlp, "in").weight[5] = 0.0  # neuron 5 ignores its input...
        getattr(mlp, "in").bias[5] = 0.75  # ...and always fires 0.75
        clean = model(tokens)
        with ablate_neurons(model, 0, [5], hook=hook, method="mean", reference=tokens):
            constant = model(tokens)
        with ablate_neurons(model, 0, [6], hook=hook, method="mean", reference=tokens):
            varying = model(tokens)
    assert_close(constant, clean, **EXACT)
    assert (varying - clean).abs().max() > 1e-8


def test_mean_ablation_sets_the_reference_mean(tokens, other_tokens):
    model = f64_model()
    name = "blocks.0.mlp.hook_post"
    reference_mean = capture(model, other_tokens, [name])[name].mean(dim=(0, 1))
    hook = neuron_ablation_hook(model, 0, [2, 9], method="mean", reference=other_tokens)
    after = capture(model, tokens, [name], fwd_hooks=[hook])[name]
    before = capture(model, tokens, [name])[name]
    assert_close(after[..., [2, 9]], reference_mean[[2, 9]].expand(3, 11, 2), **EXACT)
    keep = [n for n in range(model.cfg.d_mlp) if n not in (2, 9)]
    assert torch.equal(after[..., keep], before[..., keep])


def test_resample_draws_whole_reference_positions_deterministically(tokens, other_tokens):
    model = f64_model()
    name, neurons = "blocks.0.mlp.hook_post", [1, 4, 30]
    reference_rows = capture(model, other_tokens, [name])[name].reshape(-1, model.cfg.d_mlp)[:, neurons]

    def resampled(seed):
        hook = neuron_ablation_hook(model, 0, neurons, method="resample", reference=other_tokens, seed=seed)
        return capture(model, tokens, [name], fwd_hooks=[hook])[name][..., neurons].reshape(-1, len(neurons))

    first, again, other_seed = resampled(0), resampled(0), resampled(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)
    # Every ablated position holds one reference position's values, for all neurons at once.
    matches = (first[:, None, :] == reference_rows[None, :, :]).all(-1)
    assert matches.any(-1).all()
    # ...and the context manager draws the same on every forward pass.
    with torch.no_grad(), ablate_neurons(model, 0, neurons, method="resample", reference=other_tokens, seed=3):
        assert torch.equal(model(tokens), model(tokens))


def test_mean_and_resample_need_a_reference():
    model = f64_model()
    for method in ("mean", "resample"):
        with pytest.raises(ValueError, match="needs reference tokens"):
            neuron_ablation_hook(model, 0, [0], method=method)
    with pytest.raises(ValueError, match="method must be one of"):
        neuron_ablation_hook(model, 0, [0], method="noise")


# ---- batched sweep ------------------------------------------------------------------------


@pytest.mark.parametrize("method, hook", [("zero", "hook_post"), ("mean", "hook_pre"), ("resample", "hook_pre_linear")])
def test_batched_sweep_equals_one_at_a_time_loop(method, hook, tokens, other_tokens):
    model = f64_model()
    neurons = [0, 3, 3, 11, 20, 21, 40, 47]  # duplicates collapse
    custom = lambda logits: logits[:, 2].logsumexp(-1).mean()  # noqa: E731
    table = ablation_sweep(
        model, tokens, 1, neurons, hook=hook, method=method, reference=other_tokens, seed=2,
        metric={"lse": custom}, logit=12, logit_diff=(4, 9), ablations_per_pass=3, progress=False,
    )
    metrics = {
        "loss": loss_metric(tokens), "logit": logit_metric(12), "logit_diff": logit_diff_metric(4, 9), "lse": custom,
    }
    with torch.no_grad():
        clean_logits = model(tokens)
        clean = {name: fn(clean_logits) for name, fn in metrics.items()}
        expected = {name: [] for name in metrics}
        for n in sorted(set(neurons)):
            with ablate_neurons(model, 1, [n], hook=hook, method=method, reference=other_tokens, seed=2):
                logits = model(tokens)
            for name, fn in metrics.items():
                expected[name].append(float(fn(logits) - clean[name]))
    assert table["neuron"].tolist() == sorted(set(neurons))
    for name in metrics:
        assert_close(table[f"delta_{name}"], torch.tensor(expected[name], dtype=torch.float64), **EXACT)
    assert table.baseline["loss"] == pytest.approx(float(next_token_loss(clean_logits.double(), tokens)), rel=1e-6)


def test_sweep_chunking_does_not_change_results(tokens):
    model = f64_model()
    neurons = range(0, model.cfg.d_mlp, 3)
    one = ablation_sweep(model, tokens, 0, neurons, ablations_per_pass=1, progress=False)
    many = ablation_sweep(model, tokens, 0, neurons, ablations_per_pass=5, progress=False)
    all_at_once = ablation_sweep(model, tokens, 0, neurons, progress=False)
    assert one["neuron"].tolist() == list(neurons)
    assert_close(many["delta_loss"], one["delta_loss"], **EXACT)
    assert_close(all_at_once["delta_loss"], one["delta_loss"], **EXACT)
    with pytest.raises(ValueError, match="ablations_per_pass"):
        ablation_sweep(model, tokens, 0, ablations_per_pass=0, progress=False)


def test_sweep_logit_position_none_averages_every_position(tokens):
    model = f64_model()
    table = ablation_sweep(model, tokens, 0, [5], logit=3, position=None, progress=False)
    with torch.no_grad():
        clean = model(tokens)[..., 3].mean()
        with ablate_neurons(model, 0, [5]):
            ablated = model(tokens)[..., 3].mean()
    assert_close(table["delta_logit"], (ablated - clean).reshape(1), **EXACT)


def test_neuron_table_ranks_and_exports(tokens):
    model = f64_model()
    table = ablation_sweep(model, tokens, 0, progress=False)
    top = table.top(5)
    magnitudes = top["delta_loss"].abs()
    assert len(top) == 5 and bool((magnitudes[:-1] >= magnitudes[1:]).all())
    assert magnitudes[0] == table["delta_loss"].abs().max()
    rows = top.rows()
    assert set(rows[0]) == {"neuron", "delta_loss", "delta_loss_se", "delta_loss_p", "delta_loss_q"} and isinstance(rows[0]["neuron"], int)
    assert rows[0]["delta_loss"] == float(top["delta_loss"][0])
    frame = table.to_pandas()
    assert list(frame.columns) == ["neuron", "delta_loss", "delta_loss_se", "delta_loss_p", "delta_loss_q"] and len(frame) == model.cfg.d_mlp
    ascending = table.sort_by("delta_loss", by_abs=False, descending=False)["delta_loss"]
    assert torch.equal(ascending, table["delta_loss"].sort().values)
    with pytest.raises(KeyError, match="no column"):
        table["delta_logit"]
    assert isinstance(table, NeuronTable)


# ---- sweeps restart inside the ablated MLP (BilinearTransformer only) ----------------------

KIND_HOOKS = [
    ("bilinear", "hook_post"), ("bilinear", "hook_pre"), ("bilinear", "hook_pre_linear"),
    ("swiglu", "hook_post"), ("swiglu", "hook_pre"), ("swiglu", "hook_pre_linear"),
    ("relu", "hook_post"), ("relu", "hook_pre"), ("gelu", "hook_post"), ("gelu", "hook_pre"),
    ("linear", "hook_post"), ("linear", "hook_pre"),
]


@pytest.mark.parametrize("kind, hook", KIND_HOOKS)
def test_block_forward_from_mlp_equals_its_forward(kind, hook, tokens):
    """The sweep's fast path is the block's own code: resumed after an MLP hook point with a
    full pass's values, the block gives that pass's output bit for bit, and exactly the
    hook points after ``hook`` fire."""
    model = f64_model(mlp_kind=kind, mlp_bias=True)
    randomize_mlp_biases(model, 1)
    block = model.blocks[1]
    _, cache = model.run_with_cache(tokens)
    acts = {name: cache[f"blocks.1.mlp.{name}"] for name in block.mlp.resume_inputs(hook)}
    fired = []
    after = ([] if hook == "hook_post" else ["mlp.hook_post"]) + ["mlp.hook_out", "hook_mlp_out", "hook_resid_post"]
    record = [(f"blocks.1.{name}", lambda act, hook: fired.append(hook.name)) for name in [
        "hook_resid_pre", "hook_resid_mid", "mlp.hook_in", "mlp.hook_pre", "mlp.hook_post", "mlp.hook_out",
        "hook_mlp_out", "hook_resid_post",
    ]]
    with torch.no_grad(), model.hooks(fwd_hooks=record):
        resumed = block.forward_from_mlp(cache["blocks.1.hook_resid_mid"], hook, acts)
    assert torch.equal(resumed, cache["blocks.1.hook_resid_post"])
    assert fired == [f"blocks.1.{name}" for name in after]


def test_resuming_an_mlp_after_a_hook_it_lacks_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"MLP cannot resume after 'hook_pre_linear'; allowed: \('hook_post', 'hook_pre'\)"):
        f64_model(mlp_kind="relu").blocks[0].mlp.resume_inputs("hook_pre_linear")


def one_at_a_time(model, tokens, layer, neurons, metric, **ablation):
    """The metric's change with each neuron ablated on its own: one ordinary forward per neuron."""
    with torch.no_grad():
        clean = metric(model(tokens))
        deltas = []
        for n in neurons:
            with ablate_neurons(model, layer, [n], **ablation):
                deltas.append(float(metric(model(tokens)) - clean))
    return torch.tensor(deltas, dtype=torch.float64)


def full_forward_only(monkeypatch):
    """Make sweeps run every copy from the tokens, as they do on a TransformerBridge."""
    import bilinear_lens.activations.ablation.sweep as sweep

    monkeypatch.setattr(sweep, "starts_inside_mlp", lambda model, layer: False)


@pytest.mark.parametrize("kind, hook", KIND_HOOKS)
def test_sweep_from_inside_the_mlp_equals_the_loop_for_every_kind(kind, hook, tokens, other_tokens):
    model = f64_model(mlp_kind=kind, n_layers=3, mlp_bias=True)
    neurons = [0, 5, 17, 30, 47]
    for layer in (0, 2):  # first layer; last layer: the copies resume at start_at_layer == n_layers
        randomize_mlp_biases(model, layer)
        for method in ("zero", "mean", "resample"):
            ablation = dict(hook=hook, method=method, reference=other_tokens, seed=4)
            table = ablation_sweep(model, tokens, layer, neurons, **ablation, ablations_per_pass=2, progress=False)
            expected = one_at_a_time(model, tokens, layer, neurons, loss_metric(tokens), **ablation)
            assert_close(table["delta_loss"], expected, **EXACT)
            assert expected.abs().max() > 1e-8  # the ablations did something


def test_ablating_the_last_layer_resumes_at_the_final_norm(tokens):
    model = f64_model()
    logits, cache = model.run_with_cache(tokens)
    fired = []
    with torch.no_grad():
        resumed = model.run_with_hooks(
            cache["blocks.1.hook_resid_post"], start_at_layer=2,
            fwd_hooks=[("blocks.1.hook_resid_post", lambda act, hook: fired.append(1))],
        )
    assert torch.equal(resumed, logits)  # only ln_final and unembed ran...
    assert not fired  # ...and no block


@pytest.mark.parametrize("kind, hook, layer", [
    ("bilinear", "hook_pre_linear", 1), ("swiglu", "hook_pre", 0), ("relu", "hook_pre", 1), ("gelu", "hook_post", 1),
])
def test_patch_neurons_from_inside_the_mlp_matches_manual_patching(kind, hook, layer, tokens):
    model = f64_model(mlp_kind=kind)
    corrupted = tokens.flip(0)
    metric = logit_diff_metric(3, 8)
    neurons = [2, 9, 33, 40]
    table = patch_neurons(model, tokens, corrupted, layer, neurons, hook, metric=metric, ablations_per_pass=3,
                          progress=False)
    name = f"blocks.{layer}.mlp.{hook}"
    clean_act = capture(model, tokens, [name])[name]
    expected = []
    with torch.no_grad():
        for n in neurons:

            def patch(act, hook, n=n):
                act = act.clone()
                act[..., n] = clean_act[..., n]
                return act

            expected.append(float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)]))))
    assert_close(table["patched"], torch.tensor(expected, dtype=torch.float64), **EXACT)
    assert table["effect"].abs().max() > 1e-8


@pytest.mark.parametrize("kind, hook", [("bilinear", "hook_pre"), ("swiglu", "hook_pre_linear"), ("gelu", "hook_pre")])
def test_sweep_from_inside_the_mlp_equals_full_forwards(kind, hook, tokens, other_tokens, monkeypatch):
    model = f64_model(mlp_kind=kind)
    corrupted = tokens.roll(1, dims=1)
    metric = logit_diff_metric(2, 3)

    def tables():
        return (
            ablation_sweep(model, tokens, 1, range(0, 48, 3), hook, method="resample", reference=other_tokens,
                           logit_diff=(2, 3), ablations_per_pass=5, progress=False),
            patch_neurons(model, tokens, corrupted, 0, range(0, 48, 4), hook, metric=metric, progress=False),
        )

    inside = tables()
    full_forward_only(monkeypatch)
    full = tables()
    for ours, theirs in zip(inside, full):
        assert ours.columns.keys() == theirs.columns.keys()
        for column in ours.columns:
            # a p-value amplifies a relative change e of t = delta / se to about t^2 e (the
            # t tail's log-derivative ~ t): summation-order differences of 1e-16 become ~1e-11
            bound = dict(rtol=1e-8, atol=1e-12) if column.endswith(("_p", "_q")) else EXACT
            assert_close(ours[column], theirs[column], **bound, equal_nan=True)
    assert inside[0]["delta_loss"].abs().max() > 1e-8


def test_sweep_runs_hooks_after_the_ablated_activation_per_copy(tokens):
    model = f64_model()
    direction = torch.randn(32, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    neurons = range(0, 48, 5)  # 10 neurons, 4 per pass: chunks of 4, 4, 2 copies
    seen = {"before": [], "after": []}
    record = lambda where: lambda act, hook: seen[where].append(act.shape[0])  # noqa: E731
    # Edits before the ablated activation (run once, on the clean tokens) and after it (per copy).
    edits = [direction_ablation_hook(model, "blocks.1.hook_attn_out", direction),
             direction_ablation_hook(model, "blocks.1.hook_resid_post", direction),
             ("blocks.1.mlp.hook_pre", record("before")), ("blocks.1.hook_mlp_out", record("after"))]
    with model.hooks(fwd_hooks=edits):
        table = ablation_sweep(model, tokens, 1, neurons, ablations_per_pass=4, progress=False)
        copies = [size for size in seen["after"] if size != 3]
        assert set(seen["before"]) == {3} and copies == [12, 12, 6]
        expected = one_at_a_time(model, tokens, 1, neurons, loss_metric(tokens))
    assert_close(table["delta_loss"], expected, **EXACT)
    plain = ablation_sweep(model, tokens, 1, neurons, progress=False)
    assert (plain["delta_loss"] - table["delta_loss"]).abs().max() > 1e-8  # the edits mattered


# ---- residual directions ------------------------------------------------------------------


def test_direction_ablation_removes_exactly_that_component(tokens, other_tokens):
    model = f64_model()
    name = "blocks.1.hook_resid_pre"
    direction = torch.randn(32, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 3
    unit = direction / direction.norm()
    before = capture(model, tokens, [name])[name]
    after = capture(model, tokens, [name], fwd_hooks=[direction_ablation_hook(model, name, direction)])[name]
    assert_close(after @ unit, torch.zeros(3, 11, dtype=torch.float64), **EXACT)
    orthogonal = lambda x: x - (x @ unit)[..., None] * unit  # noqa: E731
    assert_close(orthogonal(after), orthogonal(before), **EXACT)

    reference = capture(model, other_tokens, [name])[name] @ unit
    mean_hook = direction_ablation_hook(model, name, direction, method="mean", reference=other_tokens)
    after_mean = capture(model, tokens, [name], fwd_hooks=[mean_hook])[name]
    assert_close(after_mean @ unit, reference.mean().expand(3, 11), **EXACT)
    resample_hook = direction_ablation_hook(model, name, direction, method="resample", reference=other_tokens, seed=4)
    resampled = capture(model, tokens, [name], fwd_hooks=[resample_hook])[name] @ unit
    distance = (resampled.reshape(-1, 1) - reference.reshape(1, -1)).abs().min(-1).values
    assert distance.max() < 1e-12


def test_direction_ablation_context_manager_changes_the_output(tokens):
    model = f64_model()
    direction = torch.randn(32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        clean = model(tokens)
        with ablate_direction(model, "blocks.0.hook_resid_post", direction):
            ablated = model(tokens)
        assert torch.equal(model(tokens), clean)  # hooks removed on exit
    assert (ablated - clean).abs().max() > 1e-6
    with pytest.raises(ValueError, match="shape \\(32,\\)"):
        direction_ablation_hook(model, "blocks.0.hook_resid_post", torch.ones(31, dtype=torch.float64))
    with pytest.raises(ValueError, match="nonzero"):
        direction_ablation_hook(model, "blocks.0.hook_resid_post", torch.zeros(32, dtype=torch.float64))


# ---- eigen-components of a bilinear layer -------------------------------------------------


@pytest.mark.parametrize("out_hook", ["hook_mlp_out", "mlp.hook_out"])
def test_eigen_ablation_keep_all_changes_nothing_and_keep_none_removes_u(out_hook, tokens):
    model = f64_model()
    u = model.W_U[:, 17].detach().clone()
    out_name = f"blocks.1.{out_hook}"
    with torch.no_grad():
        clean = model(tokens)
        with ablate_eigencomponents(model, 1, u, keep=model.cfg.d_model, out_hook=out_hook):
            kept_all = model(tokens)
    assert_close(kept_all, clean, rtol=0.0, atol=1e-10)

    y = capture(model, tokens, [out_name])[out_name]
    for removed in (dict(keep=0), dict(remove=range(model.cfg.d_model))):
        hooks = eigen_ablation_hooks(model, 1, u, out_hook=out_hook, **removed)
        y_ablated = capture(model, tokens, [out_name], fwd_hooks=hooks)[out_name]
        assert_close(y_ablated @ u, torch.zeros(3, 11, dtype=torch.float64), **EXACT)
        orthogonal = lambda x: x - (x @ u)[..., None] * u / (u @ u)  # noqa: E731
        assert_close(orthogonal(y_ablated), orthogonal(y), **EXACT)


def test_eigen_ablation_rank_k_matches_the_low_rank_output(tokens):
    model = f64_model()
    u = torch.randn(32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    names = ["blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out"]
    eig = eigendecompose(interaction_matrix(model.blocks[0].mlp, u))
    acts = capture(model, tokens, names, fwd_hooks=eigen_ablation_hooks(model, 0, u, keep=3))
    assert_close(acts[names[1]] @ u, low_rank_output(eig, acts[names[0]], 3), rtol=0.0, atol=1e-12)
    # remove=[i...] is keep=[the rest]
    remove = capture(model, tokens, [names[1]], fwd_hooks=eigen_ablation_hooks(model, 0, u, remove=[0, 5]))
    rest = [i for i in range(32) if i not in (0, 5)]
    keep = capture(model, tokens, [names[1]], fwd_hooks=eigen_ablation_hooks(model, 0, u, keep=rest))
    assert_close(remove[names[1]], keep[names[1]], **EXACT)


@pytest.mark.parametrize("overrides, match", [
    (dict(mlp_kind="relu"), "bilinear MLP without biases"),
    (dict(mlp_kind="swiglu"), "bilinear MLP without biases"),
    (dict(mlp_kind="bilinear", mlp_bias=True), "b_in, b_gate, b_out"),
])
def test_eigen_ablation_refuses_non_bilinear_or_biased_layers(overrides, match):
    model = f64_model(**overrides)
    with pytest.raises(ValueError, match=match):
        eigen_ablation_hooks(model, 0, torch.ones(32, dtype=torch.float64), keep=2)


def test_eigen_ablation_argument_errors():
    model = f64_model()
    u = torch.ones(32, dtype=torch.float64)
    with pytest.raises(ValueError, match="exactly one of keep"):
        eigen_ablation_hooks(model, 0, u)
    with pytest.raises(ValueError, match="exactly one of keep"):
        eigen_ablation_hooks(model, 0, u, keep=1, remove=[0])
    with pytest.raises(ValueError, match="k must be in"):
        eigen_ablation_hooks(model, 0, u, keep=33)
    with pytest.raises(ValueError, match="out of range"):
        eigen_ablation_hooks(model, 0, u, remove=[32])
    with pytest.raises(ValueError, match="out_hook"):
        eigen_ablation_hooks(model, 0, u, keep=1, out_hook="hook_resid_post")


# ---- activation patching ------------------------------------------------------------------


def test_patch_neurons_matches_manual_patching(tokens):
    model = f64_model()
    corrupted = tokens.clone()
    corrupted[:, 4] = (corrupted[:, 4] + 1) % 97
    metric = logit_diff_metric(3, 8)
    table = patch_neurons(
        model, tokens, corrupted, 0, [1, 9, 9, 33], metric=metric, ablations_per_pass=2, progress=False
    )
    name = "blocks.0.mlp.hook_post"
    clean_act = capture(model, tokens, [name])[name]
    with torch.no_grad():
        clean, corrupted_value = float(metric(model(tokens))), float(metric(model(corrupted)))
        for row, n in zip(table.rows(), [1, 9, 33]):

            def patch(act, hook, n=n):
                act = act.clone()
                act[..., n] = clean_act[..., n]
                return act

            patched = float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])))
            assert row["neuron"] == n
            assert row["patched"] == pytest.approx(patched, abs=1e-12)
            assert row["effect"] == pytest.approx(patched - corrupted_value, abs=1e-12)
            assert row["normalized"] == pytest.approx((patched - corrupted_value) / (clean - corrupted_value), abs=1e-9)
    assert table.baseline == pytest.approx({"clean": clean, "corrupted": corrupted_value})
    assert clean != corrupted_value


def test_patching_identical_runs_has_no_effect(tokens):
    model = f64_model()
    table = patch_neurons(model, tokens, tokens, 1, metric=logit_metric(5), progress=False)
    assert len(table) == model.cfg.d_mlp
    assert table["effect"].abs().max() < 1e-12
    with pytest.raises(ValueError, match="same shape"):
        patch_neurons(model, tokens, tokens[:, :5], 1, metric=logit_metric(5), progress=False)


# ---- TransformerBridge parity -------------------------------------------------------------


def test_everything_runs_through_the_bridge_with_the_same_numbers(tokens, other_tokens):
    model = f64_model()
    bridge = to_bridge(model)
    u = torch.randn(32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    for method in ("zero", "mean", "resample"):
        ours = ablation_sweep(model, tokens, 1, range(0, 48, 5), method=method, reference=other_tokens,
                              logit_diff=(2, 3), ablations_per_pass=4, progress=False)
        theirs = ablation_sweep(bridge, tokens, 1, range(0, 48, 5), method=method, reference=other_tokens,
                                logit_diff=(2, 3), ablations_per_pass=4, progress=False)
        for column in ("delta_loss", "delta_logit_diff"):
            assert_close(theirs[column], ours[column], rtol=0.0, atol=1e-10)
    corrupted = tokens.flip(1)
    ours = patch_neurons(model, tokens, corrupted, 0, metric=logit_diff_metric(2, 3), progress=False)
    theirs = patch_neurons(bridge, tokens, corrupted, 0, metric=logit_diff_metric(2, 3), progress=False)
    assert_close(theirs["patched"], ours["patched"], rtol=0.0, atol=1e-10)

    direction = torch.randn(32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        results = []
        for m in (model, bridge):
            # Not hook_resid_mid: the bridge aliases it to ln2.hook_in (an edit reaches the MLP only).
            with ablate_eigencomponents(m, 0, u, keep=4), ablate_direction(m, "blocks.1.hook_resid_pre", direction):
                with ablate_neurons(m, 1, [3, 4], hook="hook_pre_linear"):
                    results.append(m(tokens))
    assert_close(results[1], results[0], rtol=0.0, atol=1e-10)


# ---- validation ---------------------------------------------------------------------------


def test_clear_errors_for_bad_hooks_neurons_and_layers():
    model = f64_model(mlp_kind="relu")
    with pytest.raises(ValueError, match="hook must be one of"):
        neuron_ablation_hook(model, 0, [0], hook="hook_postt")
    with pytest.raises(UnknownHookError, match="hook_pre_linear"):
        neuron_ablation_hook(model, 0, [0], hook="hook_pre_linear")  # plain MLPs have no linear half
    with pytest.raises(UnknownHookError, match="did you mean"):
        direction_ablation_hook(model, "blocks.0.hook_resid_psot", torch.ones(32, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[48\] out of range \[0, 48\)"):
        neuron_ablation_hook(model, 0, [3, 48])
    with pytest.raises(ValueError, match="out of range"):
        ablation_sweep(model, torch.zeros(1, 4, dtype=torch.long), 0, [-1], progress=False)
    with pytest.raises(TypeError, match="integers"):
        neuron_ablation_hook(model, 0, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        neuron_ablation_hook(model, 2, [0])
    with pytest.raises(ValueError, match="has no MLP"):
        neuron_ablation_hook(f64_model(mlp_kind="none"), 0, [0])


# ---- CLI ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, small_tokenizer):
    tok = small_tokenizer
    root = tmp_path_factory.mktemp("ablate")
    build_model(tiny_config(d_vocab=len(tok), n_ctx=32), tokenizer=tok).save_pretrained(root / "m")
    build_model(tiny_config(d_vocab=len(tok), mlp_kind="none"), tokenizer=tok).save_pretrained(root / "attn_only")
    return root


def test_cli_json_lists_the_top_neurons(saved_model, capsys):
    rc = ablate_cmd.main(
        ["--checkpoint", str(saved_model / "m"), "--layer", "1", "--top", "4", "--n-texts", "3", "--seq-len", "16",
         "--json"]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["hook"] == "blocks.1.mlp.hook_post" and report["n_neurons"] == 48
    assert report["tokens"][1] == 16 and report["tokens"][0] >= 1
    deltas = [abs(row["delta_loss"]) for row in report["neurons"]]
    assert [row["rank"] for row in report["neurons"]] == [1, 2, 3, 4]
    assert deltas == sorted(deltas, reverse=True) and deltas[0] > 0
    # the ranking is by magnitude, and the JSON says so (it said "delta_loss")
    assert report["ranked_by"] == "|delta_loss|" and report["rank_column"] == "delta_loss"
    # every token of the 3 stories (with their BOS) is in a row; only the last row repeats some
    rows, seq_len = report["tokens"]
    assert (rows - 1) * seq_len < report["stream_tokens"] <= rows * seq_len
    assert report["overlap"] == rows * seq_len - report["stream_tokens"]


def test_cli_counts_the_whole_text_file(saved_model, tmp_path, capsys):
    """Before: a document longer than one row gave one row, its tail dropped."""
    from bilinear_lens.data.packing import document_stream
    from bilinear_lens.data.synthetic import synthetic_stories
    from bilinear_lens.models.model import BilinearTransformer

    text = tmp_path / "one_story.txt"
    text.write_text(" ".join(synthetic_stories(3, seed=4)), encoding="utf-8")  # one document, no blank line
    model = BilinearTransformer.from_pretrained(saved_model / "m")
    stream = document_stream(model.tokenizer, [text.read_text().strip()])
    assert 32 < len(stream) and len(stream) % 32, "the test needs a document of more than one row and a tail"
    rc = ablate_cmd.main(["--checkpoint", str(saved_model / "m"), "--text-file", str(text), "--json", "--top", "1"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == [-(-len(stream) // 32), 32]  # default --seq-len: min(64, n_ctx 32)
    assert report["stream_tokens"] == len(stream)
    assert report["overlap"] == report["tokens"][0] * 32 - len(stream)


def test_cli_says_how_many_documents_of_the_file_it_used(saved_model, tmp_path, capsys):
    """Before: "all N tokens of the texts" while --n-texts had dropped documents."""
    from bilinear_lens.data.synthetic import synthetic_stories

    text = tmp_path / "five.txt"
    text.write_text("\n<|endoftext|>\n".join(synthetic_stories(5, seed=7)), encoding="utf-8")
    argv = ["--checkpoint", str(saved_model / "m"), "--text-file", str(text), "--top", "1"]
    assert ablate_cmd.main([*argv, "--n-texts", "3"]) == 0
    assert "3 of the file's 5 documents (--n-texts 3)" in capsys.readouterr().out
    assert ablate_cmd.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["n_documents"], report["documents_in_file"]) == (5, 5)
    assert ablate_cmd.main(argv) == 0
    assert "all 5 documents of the file" in capsys.readouterr().out


def test_cli_refuses_a_seq_len_above_n_ctx(saved_model, capsys):
    """Before: --seq-len 64 on an n_ctx-32 model was cut to 32 silently."""
    rc = ablate_cmd.main(["--checkpoint", str(saved_model / "m"), "--seq-len", "64"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == (
        "bilinear-lens ablate: error: --seq-len 64 is longer than the model's n_ctx 32; give at most 32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cli_runs_in_half_precision(saved_model, capsys, dtype):
    """ablate offers every model dtype: it only runs forward passes (no eigendecomposition)."""
    argv = ["--checkpoint", str(saved_model / "m"), "--n-texts", "3", "--seq-len", "16", "--json", "--top", "3",
            "--device", "cpu"]
    assert ablate_cmd.main(argv) == 0
    full = json.loads(capsys.readouterr().out)
    assert ablate_cmd.main([*argv, "--dtype", dtype]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["tokens"] == full["tokens"]
    # the loss is computed in float32 from half-precision logits: close to the float32 run's
    assert half["baseline_loss"] == pytest.approx(full["baseline_loss"], rel=2e-2)
    assert all(math.isfinite(row["delta_loss"]) for row in half["neurons"])


def test_cli_table_with_a_text_file(saved_model, tmp_path, capsys):
    text = tmp_path / "texts.txt"
    text.write_text("the cat sat on the mat and was happy.\n\nthe dog ran to the park and was sad.\n", encoding="utf-8")
    from bilinear_lens.cli import main as cli_main

    rc = cli_main(["ablate", "--checkpoint", str(saved_model / "m"), "--text-file", str(text), "--seq-len", "8",
                   "--method", "mean", "--top", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "mean ablation of each of 48 neurons" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 3


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{root}/missing"], "checkpoint directory not found"),
    (["--checkpoint", "{root}/m", "--layer", "5"], "layer 5 is out of range"),
    (["--checkpoint", "{root}/attn_only"], "has no MLP"),
    (["--checkpoint", "{root}/m", "--text-file", "{root}/nope.txt"], "text file not found"),
    (["--checkpoint", "{root}/m", "--top", "0"], "--top must be >= 1"),
    (["--checkpoint", "{root}/m", "--seq-len", "1"], "--seq-len must be >= 2"),
    (["--checkpoint", "{root}/m", "--ablations-per-pass", "0"], "--ablations-per-pass must be >= 1, got 0"),
    (["--checkpoint", "{root}/m", "--ablations-per-pass", "-4"], "--ablations-per-pass must be >= 1, got -4"),
])
def test_cli_errors_exit_2_with_a_message(saved_model, capsys, args, message):
    rc = ablate_cmd.main([a.format(root=saved_model) for a in args])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err
