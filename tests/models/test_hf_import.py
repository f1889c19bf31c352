"""Import: our directories, anyone's HF Llama directories, hub ids (offline, from a cache
the test fills), push_to_hub; round trips are bitwise and bad inputs get one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.models.model import BilinearTransformer, build_model
from conftest import tiny_config
from fixtures.hub_cache import fill_cache


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer):
    return small_tokenizer


def _perturbed(model: BilinearTransformer) -> BilinearTransformer:
    """Norm weights and biases away from their init, so a round trip must carry them."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        {"normalization_type": "RMSPre", "seed": 7, "init_range": 0.05},
        {"normalization_type": "RMS", "mlp_kind": "swiglu", "attn_bias": True, "mlp_bias": True, "eps": 1e-6},
    ],
)
def test_ours_to_hf_to_ours_is_bitwise(overrides, tokenizer, tmp_path):
    model = _perturbed(build_model(tiny_config(d_vocab=len(tokenizer), rotary_base=500.0, **overrides), tokenizer=tokenizer))
    loaded = BilinearTransformer.from_pretrained(model.save_pretrained(tmp_path / "hf", format="hf"))
    assert loaded.cfg == model.cfg
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    text = "Lily was not happy."
    assert torch.equal(loaded.to_tokens(text), model.to_tokens(text))
    assert torch.equal(loaded(text), model(text))


def _llama_dir(path: Path, act: str, **overrides) -> tuple[Path, LlamaForCausalLM]:
    """A randomly initialised Llama saved by transformers itself (no code of ours)."""
    torch.manual_seed(0)
    fields = dict(vocab_size=61, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, hidden_act=act, max_position_embeddings=16, rms_norm_eps=1e-6,
                  rope_theta=20000.0, tie_word_embeddings=False)
    fields.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    with torch.no_grad():  # learned norm weights, not ones
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("act, kind", [("linear", "bilinear"), ("silu", "swiglu")])
def test_anyones_llama_dir_loads_with_same_logits(act, kind, tmp_path):
    path, hf = _llama_dir(tmp_path / "llama", act)
    model = BilinearTransformer.from_pretrained(path)
    assert model.cfg.mlp_kind == kind and model.cfg.normalization_type == "RMS"
    assert model.cfg.rotary_base == 20000.0 and model.cfg.eps == 1e-6
    tokens = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
    # measured 1.0e-7 (float32 rounding: rsqrt vs / sqrt, float32 vs float64 rotary tables)
    assert diff <= 1e-5, diff


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"model_type": "gpt2"}, r"config.json: model_type='gpt2' is not supported; allowed: 'llama'"),
        ({"hidden_act": "gelu"}, r"config.json: hidden_act='gelu' is not supported; allowed: \['linear', 'silu'\]"),
        ({"num_key_value_heads": 2}, r"config.json: num_key_value_heads=2 != num_attention_heads=4"),
        ({"tie_word_embeddings": True}, r"config.json: tie_word_embeddings=true is not supported"),
        ({"intermediate_size": 48}, r"model.safetensors does not match the model config: .*blocks.0.mlp.gate.weight: shape \(40, 32\) in file, model expects \(48, 32\)"),
    ],
)
def test_bad_llama_dirs_give_one_line_errors(edit, message, tmp_path):
    path, _ = _llama_dir(tmp_path / "llama", "linear")
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(edit)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message) as info:
        BilinearTransformer.from_pretrained(path)
    assert "\n" not in str(info.value)


def test_missing_llama_tensor_is_named(tmp_path):
    path, _ = _llama_dir(tmp_path / "llama", "silu")
    weights = load_file(str(path / "model.safetensors"))
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match its config.json: missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        BilinearTransformer.from_pretrained(path)
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(40, 32)
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)  # attention_bias is false
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['model.layers.0.self_attn.q_proj.bias'\]"):
        BilinearTransformer.from_pretrained(path)


def test_edited_llama_field_disagrees_with_our_recorded_config(tmp_path):
    path = build_model(tiny_config()).save_pretrained(tmp_path / "hf", format="hf")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json: bilinear_lens_config disagrees with the Llama fields on \['eps'\]"):
        BilinearTransformer.from_pretrained(path)


def test_parameter_free_norm_must_stay_ones(tmp_path):
    path = build_model(tiny_config()).save_pretrained(tmp_path / "hf", format="hf")
    weights = load_file(str(path / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.norm.weight is not all ones, but the config says parameter-free RMSNorm"):
        BilinearTransformer.from_pretrained(path)


def test_directory_of_unknown_format_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"has neither 'format' \(bilinear-lens\) nor 'model_type'"):
        BilinearTransformer.from_pretrained(tmp_path / "m")


# ---- hub ids: a cache filled by the test, HF_HUB_OFFLINE on, never the network ----

def test_hub_id_loads_from_the_cache_offline(offline_cache, tokenizer, tmp_path):
    model = build_model(tiny_config(d_vocab=len(tokenizer)), tokenizer=tokenizer)
    fill_cache(offline_cache, "someone/tiny-bilinear", model.save_pretrained(tmp_path / "hf", format="hf"))
    loaded = BilinearTransformer.from_pretrained("someone/tiny-bilinear")
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded("Lily was happy."), model("Lily was happy."))


def test_hub_id_offline_and_not_cached_is_one_line(offline_cache):
    with pytest.raises(CheckpointError, match=r"'someone/absent' is not a local directory and the hub model cannot be fetched \(HF_HUB_OFFLINE is set\): .*to work offline pass a local directory or fill the cache") as info:
        BilinearTransformer.from_pretrained("someone/absent")
    assert "\n" not in str(info.value)


def test_missing_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    # Relative to an empty directory, so a quickstart's runs/tiny/final in the user's
    # working directory cannot make the path exist.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        BilinearTransformer.from_pretrained("runs/tiny/final")


def test_push_to_hub_uploads_the_hf_format(monkeypatch, tmp_path):
    uploaded: dict = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, **kwargs):
            uploaded["created"] = repo_id

        def upload_folder(self, folder_path, repo_id, **kwargs):
            shutil.copytree(folder_path, tmp_path / "uploaded")
            uploaded["repo"] = repo_id
            return "commit-info"

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model = build_model(tiny_config())
    assert model.push_to_hub("me/tiny", token="t") == "commit-info"
    assert uploaded == {"token": "t", "created": "me/tiny", "repo": "me/tiny"}
    assert json.loads((tmp_path / "uploaded" / "config.json").read_text())["model_type"] == "llama"
    loaded = BilinearTransformer.from_pretrained(tmp_path / "uploaded")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
