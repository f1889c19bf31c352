"""Every cfg.json field SAELens 6.x writes is honoured, ignored (cannot change results) or
refused (issue #21 item 1). Fixtures are written in SAELens' documented layouts
(``TopKTrainingSAEConfig.to_dict`` for the trainer's mid-run checkpoints,
``get_inference_sae_cfg_dict`` plus ``_fold_norm_topk`` for its final save), with the expected
encode / decode computed from SAELens' ``TopKSAE`` formulas (``sae_lens/saes/topk_sae.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bilinear_lens.sae.config import IGNORED_FIELDS, SAEConfig, SAEConfigError
from bilinear_lens.sae.model import SAE, load_sae, save_sae

D_IN, D_SAE, K = 16, 48, 4
HOOK = "blocks.0.hook_resid_mid"


def sae_lens_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Unfolded weights as mid-training: decoder rows with norms far from 1 (0.05 .. 3)."""
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(D_SAE, D_IN, generator=gen)
    w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True) * torch.linspace(0.05, 3.0, D_SAE)[torch.randperm(D_SAE, generator=gen)][:, None]
    return {"W_enc": torch.randn(D_IN, D_SAE, generator=gen), "b_enc": torch.randn(D_SAE, generator=gen) * 0.1,
            "W_dec": w_dec, "b_dec": torch.randn(D_IN, generator=gen) * 0.1}


def topk_training_cfg(**changes) -> dict:
    """What SAELens 6's trainer writes in a mid-run checkpoint (``TrainingSAE.save_model`` ->
    ``TopKTrainingSAEConfig.to_dict()``): every field of the training config, defaults included."""
    cfg = {
        "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.18.0", "sae_lens_training_version": "6.18.0", "model_name": "tiny",
                     "hook_name": HOOK, "hook_head_index": None, "context_size": 16, "prepend_bos": True,
                     "seqpos_slice": [None], "model_from_pretrained_kwargs": {}, "dataset_path": "stories",
                     "model_class_name": "HookedTransformer", "exclude_special_tokens": False,
                     "sequence_separator_token": "bos", "disable_concat_sequences": False},
        "decoder_init_norm": 0.1, "k": K, "use_sparse_activations": False, "aux_loss_coefficient": 1.0,
        "rescale_acts_by_decoder_norm": True, "architecture": "topk",
    }
    cfg.update(changes)
    return cfg


def write_dir(path: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def sae_lens_topk_encode(t: dict, x: torch.Tensor, k: int, rescale: bool) -> torch.Tensor:
    """SAELens' ``TopKSAE.encode``: ``process_sae_in`` (x - b_dec), ``hidden_pre = sae_in @ W_enc
    + b_enc``, times ``W_dec.norm(dim=-1)`` when rescaling, then ``TopK``: ``torch.topk(k,
    sorted=False)``, ReLU on the kept values, scattered into zeros."""
    hidden_pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    if rescale:
        hidden_pre = hidden_pre * t["W_dec"].norm(dim=-1)
    values, indices = torch.topk(hidden_pre, k=k, dim=-1, sorted=False)
    return torch.zeros_like(hidden_pre).scatter_(-1, indices, values.relu())


def sae_lens_topk_decode(t: dict, f: torch.Tensor, rescale: bool) -> torch.Tensor:
    """SAELens' ``TopKSAE.decode`` (``_act_times_W_dec``, both the inference and the training
    SAE in current SAELens): ``f * (1 / W_dec.norm(dim=-1))`` when rescaling, ``@ W_dec + b_dec``
    (6.18's inference decode divided instead: within 1 ulp of this)."""
    if rescale:
        f = f * (1 / t["W_dec"].norm(dim=-1))
    return f @ t["W_dec"] + t["b_dec"]


def fold_norm_topk(t: dict) -> dict:
    """SAELens' ``_fold_norm_topk`` (applied by ``save_inference_model`` when rescaling)."""
    norm = t["W_dec"].norm(dim=-1)
    return {"W_enc": t["W_enc"] * norm[None, :], "b_enc": t["b_enc"] * norm, "W_dec": t["W_dec"] / norm[:, None], "b_dec": t["b_dec"]}


def inputs() -> torch.Tensor:
    return torch.randn(64, D_IN, generator=torch.Generator().manual_seed(1))


def test_mid_run_topk_checkpoint_with_rescale_encodes_as_sae_lens(tmp_path):
    """The trainer's mid-run cfg (rescale true, unfolded weights): encode and decode are
    SAELens' to the last bit of the same float32 operations, and the rescale changes which
    features are active (so ignoring it, the old behaviour, is a silent wrong result)."""
    t = sae_lens_tensors()
    sae = load_sae(write_dir(tmp_path / "mid", topk_training_cfg(), t))
    assert sae.cfg.rescale_acts_by_decoder_norm is True
    x = inputs()
    with torch.no_grad():
        f = sae.encode(x)
        expected = sae_lens_topk_encode(t, x, K, rescale=True)
        torch.testing.assert_close(f, expected, rtol=0, atol=0)
        torch.testing.assert_close(sae.decode(f), sae_lens_topk_decode(t, expected, rescale=True), rtol=0, atol=0)
        unscaled = sae_lens_topk_encode(t, x, K, rescale=False)
    assert ((f > 0) != (unscaled > 0)).any(dim=-1).float().mean() > 0.5  # the field matters on these weights


def test_final_save_folds_to_the_same_sae(tmp_path):
    """SAELens' final save folds the norms into the weights (rescale stays true, now a no-op up to
    rounding): it loads as the same function as the mid-run one. Bound: folding rescales each
    weight by one float32 multiply, so values agree to float32 reordering (FLOAT32_REORDERED)."""
    t = sae_lens_tensors()
    final_cfg = {k: v for k, v in topk_training_cfg().items()
                 if k not in ("decoder_init_norm", "use_sparse_activations", "aux_loss_coefficient")}
    mid = load_sae(write_dir(tmp_path / "mid", topk_training_cfg(), t))
    final = load_sae(write_dir(tmp_path / "final", final_cfg, fold_norm_topk(t)))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(mid.encode(x) > 0, final.encode(x) > 0)
        torch.testing.assert_close(final.encode(x), mid.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(final(x), mid(x), rtol=1e-5, atol=1e-5)


def test_rescale_round_trips_through_save_sae(tmp_path):
    t = sae_lens_tensors()
    sae = load_sae(write_dir(tmp_path / "mid", topk_training_cfg(), t))
    save_sae(sae, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "cfg.json").read_text())
    assert written["rescale_acts_by_decoder_norm"] is True
    again = load_sae(tmp_path / "again")
    assert again.cfg == sae.cfg
    x = inputs()
    with torch.no_grad():
        assert torch.equal(again.encode(x), sae.encode(x))


@pytest.mark.parametrize("name", sorted(set(IGNORED_FIELDS) - {"sae_lens_version"}))
def test_each_ignored_field_cannot_change_results(tmp_path, name):
    """Changing (or dropping) an ignored field leaves encode and decode bit-identical."""
    t = sae_lens_tensors()
    odd = {"device": "cuda:3", "sae_lens_training_version": "9.9.9", "decoder_init_norm": 7.0, "l1_coefficient": 5.0,
           "lp_norm": 2.0, "l1_warm_up_steps": 100, "aux_loss_coefficient": 0.0, "use_sparse_activations": True,
           "dataset_trust_remote_code": False}
    base = load_sae(write_dir(tmp_path / "base", topk_training_cfg(), t))
    changed = load_sae(write_dir(tmp_path / "changed", topk_training_cfg(**{name: odd[name]}), t))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(changed.encode(x), base.encode(x)) and torch.equal(changed(x), base(x))
    assert changed.cfg == base.cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"topk_threshold_lr": 0.01}, "unknown field(s) ['topk_threshold_lr']"),
        ({"architecture": "batchtopk"}, "architecture='batchtopk' is not supported"),
        ({"architecture": "jumprelu"}, "architecture='jumprelu' is not supported"),
        ({"architecture": "transcoder", "d_out": D_IN}, "unknown field(s) ['d_out']"),
        ({"reshape_activations": "hook_z"}, "reshape_activations='hook_z' is not supported"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations='expected_average_only_in' is not supported"),
        ({"hook_name_out": "blocks.0.hook_mlp_out"}, "hook_name_out='blocks.0.hook_mlp_out': transcoders"),
        ({"architecture": "standard", "k": None}, "rescale_acts_by_decoder_norm=true is only meaningful for architecture='topk'"),
        ({"rescale_acts_by_decoder_norm": "yes"}, "rescale_acts_by_decoder_norm must be true or false, got 'yes'"),
    ],
)
def test_fields_that_would_change_results_are_refused(tmp_path, changes, message):
    cfg = {k: v for k, v in topk_training_cfg(**changes).items() if v is not None or k == "k"}
    if cfg.get("k") is None:
        cfg.pop("k", None)
    if "hook_name_out" in changes:
        cfg["metadata"] = {**cfg["metadata"], "hook_name_out": cfg.pop("hook_name_out")}
    directory = write_dir(tmp_path / "bad", cfg, sae_lens_tensors())
    with pytest.raises(SAEConfigError) as err:
        load_sae(directory)
    assert message in str(err.value) and str(directory / "cfg.json") in str(err.value) and "\n" not in str(err.value)


def test_pre_6_fields(tmp_path):
    """Pre-6 flat layout: the runner's own fields are dropped as SAELens does; a boolean
    ``normalize_activations: true`` meant the dataset-wide scale (refused), ``false`` none;
    ``finetuning_scaling_factor: true`` (a learned decoder scale) is refused."""
    t = sae_lens_tensors()
    old = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": HOOK, "hook_point_layer": 0, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": K}, "dtype": "torch.float32", "model_name": "tiny", "lr": 3e-4,
           "l1_coefficient": 1.0, "normalize_activations": False, "finetuning_scaling_factor": False}
    sae = load_sae(write_dir(tmp_path / "old", old, t))
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), sae_lens_topk_encode(t, x, K, rescale=False), rtol=0, atol=0)
    for changes, message in (({"normalize_activations": True}, "normalize_activations='expected_average_only_in' is not supported"),
                             ({"finetuning_scaling_factor": True}, "finetuning_scaling_factor=true is not supported")):
        directory = write_dir(tmp_path / next(iter(changes)), {**old, **changes}, t)
        with pytest.raises(SAEConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_sae(directory)


def test_metadata_sae_lens_writes_is_kept(tmp_path):
    """The trainer's metadata survives load -> save (SAELens then shows model_name etc.)."""
    sae = load_sae(write_dir(tmp_path / "mid", topk_training_cfg(), sae_lens_tensors()))
    save_sae(sae, tmp_path / "again")
    meta = json.loads((tmp_path / "again" / "cfg.json").read_text())["metadata"]
    source = topk_training_cfg()["metadata"]
    for key in ("model_name", "context_size", "prepend_bos", "dataset_path", "model_class_name", "seqpos_slice",
                "sequence_separator_token"):
        assert meta[key] == source[key], key


# --- item 6: the metadata our trainer writes -------------------------------------------

@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory, small_tokenizer):
    from bilinear_lens.models.model import build_model
    from conftest import tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(d_vocab=len(small_tokenizer), n_layers=1), tokenizer=small_tokenizer)
    return model.save_pretrained(tmp_path_factory.mktemp("interop_sae") / "m")


def _recipe(tmp_path, **train):
    from bilinear_lens.sae.recipe import SAERecipe

    data = {"source": "synthetic", "max_docs": 300, "val_fraction": 0.1, "cache_dir": str(tmp_path / "cache")}
    settings = dict(steps=4, batch_size=8, lr=3e-3, min_lr=3e-4, log_every=2, eval_every=0, eval_batches=1,
                    checkpoint_every=2, keep_last=2, **train)
    return SAERecipe.from_dict({"sae": dict(expansion=2, k=4), "train": settings, "data": data}, where="test recipe")


def test_trained_sae_metadata_names_model_data_and_bos(model_checkpoint, tmp_path):
    """SAELens shows model_name etc. from metadata: the trainer writes model_name (the model
    path given), context_size, dataset_path (data.source) and prepend_bos (false: packed
    blocks do not start with a BOS each). A run saved before this metadata (context_size
    only) still resumes, and its SAE gets the full metadata."""
    from bilinear_lens.sae.train import train_sae

    train_sae(model_checkpoint, tmp_path / "run", _recipe(tmp_path), progress=False, stop_at=2)
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_000002" / "cfg.json").read_text())["metadata"]
    assert meta["model_name"] == str(model_checkpoint) and meta["context_size"] == 16
    assert meta["dataset_path"] == "synthetic" and meta["prepend_bos"] is False
    old = tmp_path / "run" / "checkpoints" / "step_000002" / "cfg.json"
    cfg = json.loads(old.read_text())
    cfg["metadata"] = {k: v for k, v in cfg["metadata"].items() if k not in ("model_name", "dataset_path", "prepend_bos")}
    old.write_text(json.dumps(cfg))
    train_sae(model_checkpoint, tmp_path / "run", _recipe(tmp_path), progress=False, resume=True)
    final = load_sae(tmp_path / "run")
    assert final.cfg.metadata["model_name"] == str(model_checkpoint) and final.cfg.metadata["prepend_bos"] is False
