"""SAE I/O in SAELens' format: exact round trips, both cfg.json layouts, the encode /
decode formulas against a direct reference, and one-line errors for bad directories."""

import json

import pytest
import torch

from bilinear_lens.models.model import build_model
from bilinear_lens.sae.config import SAEConfig, SAEConfigError
from bilinear_lens.sae.model import SAE, load_sae, save_sae
from conftest import tiny_config


def random_sae(architecture="topk", normalize="none", d_in=32, d_sae=64, seed=0, **kw):
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, hook_name="blocks.0.hook_resid_mid", architecture=architecture,
                    k=5 if architecture == "topk" else None, normalize_activations=normalize, **kw)
    sae = SAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return sae


def reference_encode(sae, x):
    """SAELens' formulas written out directly (no normalisation)."""
    pre = (x - sae.b_dec * sae.cfg.apply_b_dec_to_input) @ sae.W_enc + sae.b_enc
    if sae.cfg.architecture == "standard":
        return pre.relu()
    keep = torch.zeros_like(pre, dtype=torch.bool)
    for row, idx in zip(keep.view(-1, pre.shape[-1]), pre.view(-1, pre.shape[-1]).argsort(-1, descending=True)):
        row[idx[: sae.cfg.k]] = True
    return torch.where(keep, pre.relu(), torch.zeros_like(pre))


@pytest.mark.parametrize("architecture", ["standard", "topk"])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_encode_decode_match_reference(architecture, apply_b_dec):
    sae = random_sae(architecture, apply_b_dec_to_input=apply_b_dec)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f = sae.encode(x)
        torch.testing.assert_close(f, reference_encode(sae, x), rtol=0, atol=0)
        torch.testing.assert_close(sae(x), f @ sae.W_dec + sae.b_dec, rtol=0, atol=0)
    if architecture == "topk":
        assert int((f > 0).sum(-1).max()) <= 5


@pytest.mark.parametrize("normalize", ["constant_norm_rescale", "layer_norm"])
def test_normalization_is_undone_on_reconstruction(normalize):
    """forward = n^-1(decode(encode(n(x)))): scaling x by c > 0 scales constant_norm_rescale's
    reconstruction by c (n(x) is scale free); layer_norm's equals x * std + mean of the
    normalised reconstruction."""
    sae = random_sae("standard", normalize=normalize)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float32)
    with torch.no_grad():
        if normalize == "constant_norm_rescale":
            torch.testing.assert_close(sae(3.0 * x), 3.0 * sae(x), rtol=1e-5, atol=1e-5)  # float32 rounding
        else:
            mu, std = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
            xn = (x - mu) / (std + 1e-5)
            recon = reference_encode(sae, xn) @ sae.W_dec + sae.b_dec
            torch.testing.assert_close(sae(x), recon * std + mu, rtol=1e-5, atol=1e-5)  # float32 rounding
        with pytest.raises(ValueError, match=f"normalize_activations='{normalize}' needs the norm_state"):
            sae.decode(sae.encode(x))
        _, state = sae.normalize_input(x)
        torch.testing.assert_close(sae.decode(sae.encode(x), state), sae(x), rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_round_trip_is_exact(tmp_path, architecture):
    sae = random_sae(architecture, metadata={"model_name": "tiny", "context_size": 16})
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg == sae.cfg
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    # SAELens >= 6 layout: flat dataclass fields + metadata; sae_lens_version selects it
    assert cfg["architecture"] == architecture and cfg["d_in"] == 32 and cfg["d_sae"] == 64
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_mid"
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert ("k" in cfg) == (architecture == "topk")
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (32, 64), "b_enc": (64,), "W_dec": (64, 32), "b_dec": (32,)}


def _write_dir(tmp_path, cfg, sae):
    directory = tmp_path / "external"
    directory.mkdir()
    (directory / "cfg.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(directory / "sae_weights.safetensors"))
    return directory


def test_reads_pre_6_layout_topk_and_relu(tmp_path):
    """SAELens < 6 wrote flat metadata and activation_fn_str / activation_fn_kwargs."""
    sae = random_sae("topk")
    old = {"d_in": 32, "d_sae": 64, "hook_point": "blocks.0.hook_resid_mid", "hook_point_layer": 0,
           "hook_point_head_index": None, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5},
           "dtype": "torch.float32", "model_name": "tiny", "normalize_activations": False, "context_size": 16}
    loaded = load_sae(_write_dir(tmp_path, old, sae))
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == 5 and loaded.cfg.apply_b_dec_to_input
    assert loaded.cfg.normalize_activations == "none"
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=0, atol=0)
    relu = dict(old, activation_fn_str="relu", hook_point="blocks.1.hook_resid_post")
    relu.pop("activation_fn_kwargs")
    (tmp_path / "external" / "cfg.json").write_text(json.dumps(relu))
    assert load_sae(tmp_path / "external").cfg.architecture == "standard"


def _cfg(**changes):
    cfg = SAEConfig(d_in=32, d_sae=64, hook_name="blocks.0.hook_resid_mid", k=5).to_sae_lens_dict()
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"d_sae": None}, "cfg.json: missing field(s) ['d_sae']"),
        ({"metadata": {"sae_lens_version": "6.0.0"}}, "cfg.json: missing field(s) ['hook_name']"),
        ({"architecture": "jumprelu"}, "cfg.json: architecture='jumprelu' is not supported; allowed: ['standard', 'topk']"),
        ({"k": 0}, "cfg.json: k must be an integer in [1, d_sae=64] for a topk SAE, got 0"),
        ({"normalize_activations": "expected_average_only_in"}, "normalize_activations='expected_average_only_in' is not supported"),
        ({"dtype": "int8"}, "cfg.json: dtype='int8' is not supported"),
    ],
)
def test_bad_cfg_json_one_line_error(tmp_path, changes, message):
    directory = _write_dir(tmp_path, {k: v for k, v in _cfg(**changes).items() if v is not None}, random_sae())
    with pytest.raises(SAEConfigError) as err:
        load_sae(directory)
    assert message in str(err.value) and str(directory / "cfg.json") in str(err.value)
    assert "\n" not in str(err.value)


def test_sae_must_fit_model(tmp_path):
    model = build_model(tiny_config())  # d_model 32
    save_sae(random_sae(d_in=16), tmp_path / "narrow")
    with pytest.raises(SAEConfigError, match=r"cfg.json: field d_in=16 does not match the model: "
                                             r"blocks.0.hook_resid_mid is 32 wide \(d_model=32\)"):
        load_sae(tmp_path / "narrow", model=model)
    sae = random_sae()
    sae.cfg = SAEConfig(**{**sae.cfg.__dict__, "hook_name": "blocks.7.hook_resid_mid"})
    save_sae(sae, tmp_path / "nohook")
    with pytest.raises(SAEConfigError, match=r"field hook_name='blocks.7.hook_resid_mid': unknown hook name"):
        load_sae(tmp_path / "nohook", model=model)
    assert load_sae(tmp_path / "nohook").cfg.hook_name == "blocks.7.hook_resid_mid"  # fine without a model


def test_corrupt_weights_name_file(tmp_path):
    save_sae(random_sae(), tmp_path / "s")
    (tmp_path / "s" / "sae_weights.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="sae_weights.safetensors is corrupt"):
        load_sae(tmp_path / "s")


def test_feature_acts_read_the_hook():
    torch.manual_seed(0)
    model = build_model(tiny_config())
    sae = random_sae()
    tokens = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    _, cache = model.run_with_cache(tokens)
    with torch.no_grad():
        torch.testing.assert_close(sae.feature_acts(model, tokens), sae.encode(cache["blocks.0.hook_resid_mid"]),
                                   rtol=0, atol=0)
