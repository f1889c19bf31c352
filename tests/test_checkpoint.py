"""save_pretrained / from_pretrained: round trips, atomic writes, clear load errors."""

import json

import pytest
import torch

from bilinear_lens.models.checkpoint import CheckpointError, atomic_directory
from bilinear_lens.models.model import load_model
from bilinear_lens.models.model import BilinearTransformer, build_model
from bilinear_lens.data.synthetic import synthetic_stories
from bilinear_lens.data.tokenizer import to_hf_tokenizer, train_tokenizer
from conftest import MLP_KINDS, tiny_config


@pytest.mark.parametrize("kind", MLP_KINDS)
def test_round_trip_gives_identical_logits(kind, tmp_path, tokens):
    model = build_model(tiny_config(mlp_kind=kind, seed=3))
    path = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = BilinearTransformer.from_pretrained(path)
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded(tokens), model(tokens))


def test_round_trip_with_tokenizer(tmp_path):
    tok = to_hf_tokenizer(train_tokenizer(synthetic_stories(200, seed=0), vocab_size=300))
    model = build_model(tiny_config(d_vocab=len(tok)), tokenizer=tok)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").is_file()
    loaded = BilinearTransformer.from_pretrained(tmp_path / "m")
    text = "Lily was not happy."
    assert torch.equal(loaded.to_tokens(text), model.to_tokens(text))
    assert loaded.to_string(loaded.to_tokens(text, prepend_bos=False)[0]) == text
    assert torch.equal(loaded(text), model(text))


def test_loading_never_unpickles(tmp_path):
    """A pickle disguised as the weights file is rejected, not executed."""
    model = build_model(tiny_config())
    model.save_pretrained(tmp_path / "m")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        load_model(tmp_path / "m")
    assert not marker.exists()


def test_load_errors_name_file_and_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(tmp_path / "nowhere")
    model = build_model(tiny_config())
    path = model.save_pretrained(tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt"):
        load_model(path)
    model.save_pretrained(path)
    (path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        load_model(path)
    model.save_pretrained(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model weights not found"):
        load_model(path)


def test_config_weight_mismatch_is_reported(tmp_path):
    build_model(tiny_config(d_mlp=48)).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["d_mlp"] = 64
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"blocks.0.mlp.gate.weight: shape \(48, 32\) in file, model expects \(64, 32\)"):
        load_model(tmp_path / "m")
    cfg["mlp_kind"] = "relu"
    cfg["d_mlp"] = 48
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unexpected tensors"):
        load_model(tmp_path / "m")
    cfg["format"] = "something-else"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a bilinear-lens config"):
        load_model(tmp_path / "m")


def test_failed_write_keeps_previous_checkpoint(tmp_path, tokens):
    model = build_model(tiny_config(seed=1))
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_directory(tmp_path / "m") as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("disk full")
    assert torch.equal(BilinearTransformer.from_pretrained(tmp_path / "m")(tokens), model(tokens))
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "temporary directories must be cleaned up"
