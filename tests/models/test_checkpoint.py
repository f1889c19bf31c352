"""save_pretrained / from_pretrained: round trips, atomic writes, clear load errors."""

import json

import pytest
import torch

from bilinear_lens.files.atomic import atomic_directory
from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.models.model import load_model
from bilinear_lens.models.model import BilinearTransformer, build_model
from conftest import MLP_KINDS, tiny_config


@pytest.mark.parametrize("kind", MLP_KINDS)
def test_round_trip_gives_identical_logits(kind, tmp_path, tokens):
    model = build_model(tiny_config(mlp_kind=kind, seed=3))
    path = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = BilinearTransformer.from_pretrained(path)
    assert loaded.cfg == model.cfg
    assert torch.equal(loaded(tokens), model(tokens))


def test_round_trip_with_tokenizer(tmp_path, small_tokenizer):
    tok = small_tokenizer
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


# ---- load-time checks: non-finite weights, edited configs, corrupt tokenizers (issue 14) ----

from safetensors.torch import load_file, save_file  # noqa: E402

from bilinear_lens.files.serialized import read_tensor_metadata  # noqa: E402

from bilinear_lens.cli import main as cli_main  # noqa: E402


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad, tmp_path):
    path = build_model(tiny_config()).save_pretrained(tmp_path / "m")
    weights_path = path / "model.safetensors"
    meta = read_tensor_metadata(weights_path)
    weights = load_file(str(weights_path))
    weights["blocks.1.mlp.out.weight"][3, 4] = bad
    save_file(weights, str(weights_path), metadata=meta)
    kind = "1 NaN, 0 inf" if bad != bad else "0 NaN, 1 inf"
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor blocks.1.mlp.out.weight holds non-finite values \({kind}\)"):
        load_model(path)


@pytest.mark.parametrize(
    "field, value",
    [("n_heads", 2), ("mlp_kind", "swiglu"), ("normalization_type", "LNPre"), ("rotary_base", 500.0), ("n_ctx", 32), ("eps", 1e-3)],
)
def test_shape_preserving_config_edits_are_refused(field, value, tmp_path):
    path = build_model(tiny_config()).save_pretrained(tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    old = cfg[field]
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config.json: the config differs from the one the weights were saved with \({field}: config {value!r}, weights saved with {old!r}\)"):
        load_model(path)


def test_checkpoints_without_the_config_record_still_load(tmp_path, tokens):
    model = build_model(tiny_config())
    path = model.save_pretrained(tmp_path / "m")
    save_file(load_file(str(path / "model.safetensors")), str(path / "model.safetensors"), metadata={"format": "bilinear-lens"})
    assert torch.equal(load_model(path)(tokens), model(tokens))
    seed_only = json.loads((path / "config.json").read_text())
    seed_only["seed"] = 99  # init-only fields do not change what the weights compute
    (path / "config.json").write_text(json.dumps(seed_only))
    assert torch.equal(load_model(path)(tokens), model(tokens))


@pytest.fixture
def with_tokenizer(tmp_path, small_tokenizer):
    tok = small_tokenizer
    return build_model(tiny_config(d_vocab=len(tok), n_ctx=64), tokenizer=tok).save_pretrained(tmp_path / "m")


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00binary", b'{"version": "1.0", "truncated'])
def test_corrupt_tokenizer_is_one_line(content, with_tokenizer):
    (with_tokenizer / "tokenizer.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"tokenizer file .*m/tokenizer.json is corrupt or not a tokenizers JSON file") as info:
        load_model(with_tokenizer)
    assert "\n" not in str(info.value)


def test_corrupt_tokenizer_config_is_one_line(with_tokenizer):
    (with_tokenizer / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"tokenizer files in .*m \(tokenizer_config.json\) cannot be loaded") as info:
        load_model(with_tokenizer)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["eigen", "--checkpoint", "{m}", "--token", " happy"],
        ["ablate", "--checkpoint", "{m}"],
        ["polytope", "--checkpoint", "{m}", "--text-file", "{m}/config.json"],
        ["report", "--checkpoint", "{m}", "--out", "{m}/../r.html"],
        ["convert", "{m}", "--out", "{m}/../converted"],
    ],
    ids=lambda a: a[0],
)
def test_every_command_reports_a_corrupt_tokenizer_in_one_line(argv, with_tokenizer, capsys):
    (with_tokenizer / "tokenizer.json").write_bytes(b"\x00\xff\x00binary")
    assert cli_main([a.format(m=with_tokenizer) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "tokenizer.json is corrupt or not a tokenizers JSON file" in err and err.count("\n") == 1, err
