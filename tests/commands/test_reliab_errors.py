"""Issue 24.8 and 24.9: one-line named errors instead of tracebacks, and no silent results
(garbled weights, integer SAE weights, special-token literals, local paths sent to the hub)."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from bilinear_lens.commands import polytope as polytope_cmd
from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.models.hf_llama import model_config_from_llama
from bilinear_lens.models.hub import resolve_model_dir
from bilinear_lens.models.model import BilinearTransformer, build_model
from bilinear_lens.tensor_checksum import CHECKSUM_KEY
from bilinear_lens.weights.directions import token_id
from conftest import tiny_config

LLAMA = {"model_type": "llama", "hidden_act": "silu", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 16}


@pytest.mark.parametrize("edit, message", [
    ({"rope_parameters": [1, 2]}, "rope_parameters=[1, 2] must be an object"),
    ({"hidden_size": "64"}, "hidden_size='64' must be an integer >= 1"),
    ({"rope_theta": "abc"}, "rope_theta='abc' must be a positive number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1}}, "rope_parameters.rope_theta=-1 must be a positive number"),
    ({"num_attention_heads": 0}, "num_attention_heads=0 must be an integer >= 1"),
    ({"num_key_value_heads": True}, "num_key_value_heads=True must be an integer >= 1"),
])
def test_llama_config_with_wrong_types_names_file_and_field(edit, message) -> None:
    with pytest.raises(CheckpointError) as err:
        model_config_from_llama({**LLAMA, **edit}, where="dir/config.json")
    assert str(err.value) == f"dir/config.json: {message}" or str(err.value).startswith(f"dir/config.json: {message}")
    assert "grouped-query" not in str(err.value)
    assert model_config_from_llama(LLAMA, where="x").d_model == 32  # the unedited config reads


def test_from_pretrained_devices_follow_the_one_device_rule(tmp_path) -> None:
    build_model(tiny_config()).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"^device 'bogus' is not one of auto, cpu, cuda, cuda:N$"):
        BilinearTransformer.from_pretrained(tmp_path / "m", device="bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^device 'cuda': CUDA is not available on this machine; use auto or cpu$"):
            BilinearTransformer.from_pretrained(tmp_path / "m", device="cuda")
    assert BilinearTransformer.from_pretrained(tmp_path / "m", device="auto").cfg.d_model == 32


def test_invalid_utf8_token_is_a_named_error(tmp_path, small_tokenizer) -> None:
    tok = small_tokenizer
    model = build_model(tiny_config(d_vocab=len(tok)), tokenizer=tok)
    argv_text = os.fsdecode(b"\xff")  # what sys.argv holds for an invalid UTF-8 byte
    with pytest.raises(ValueError, match=r"is not valid UTF-8 text \(byte 0xff at character 0\)"):
        token_id(model, argv_text)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, small_tokenizer):
    tok = small_tokenizer
    root = tmp_path_factory.mktemp("errors")
    build_model(tiny_config(d_vocab=len(tok), n_ctx=16), tokenizer=tok).save_pretrained(root / "m")
    return root


def test_polytope_seed_range_and_special_token_literal(text_model, capsys) -> None:
    from bilinear_lens.data.synthetic import synthetic_stories

    text = text_model / "t.txt"
    text.write_text("\n\n".join(synthetic_stories(6, seed=1)) + "\n\n a <|endoftext|> b", encoding="utf-8")
    argv = ["--checkpoint", str(text_model / "m"), "--text-file", str(text), "--max-tokens", "200"]
    assert polytope_cmd.main([*argv, "--seed", "-1"]) == 2
    assert capsys.readouterr().err == "bilinear-lens polytope: error: --seed must be >= 0, got -1\n"
    assert polytope_cmd.main([*argv, "--seed", str(2**32)]) == 2
    assert "--seed must be < 2**32" in capsys.readouterr().err
    assert polytope_cmd.main(argv) == 0
    err = capsys.readouterr().err
    model = BilinearTransformer.from_pretrained(text_model / "m")
    special = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (f"holds the literal '<|endoftext|>' 1 time(s) inside its documents (--documents auto); it is read as the "
            f"special token (id {special}), not as text") in err


def test_garbled_finite_weights_are_refused_by_checksum(tmp_path) -> None:
    model = build_model(tiny_config())
    for fmt in ("bilinear-lens", "hf"):
        out = tmp_path / fmt
        model.save_pretrained(out, format=fmt)
        weights = out / "model.safetensors"
        data = bytearray(weights.read_bytes())
        header = 8 + int.from_bytes(data[:8], "little")
        entries = json.loads(data[8:header].decode())
        assert CHECKSUM_KEY in entries["__metadata__"]
        name = "embed.weight" if fmt == "bilinear-lens" else "model.embed_tokens.weight"
        data[header + entries[name]["data_offsets"][0]] ^= 1  # an embedding's lowest mantissa bit: finite, plausible
        weights.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=r"model.safetensors: the tensors do not match the checksum recorded when they were saved"):
            BilinearTransformer.from_pretrained(out)


def test_load_sae_refuses_integer_weights(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    from bilinear_lens.sae.config import SAEConfig
    from bilinear_lens.sae.model import SAE, load_sae, save_sae

    sae = SAE(SAEConfig(d_in=32, d_sae=64, k=4, hook_name="blocks.0.hook_resid_mid"))
    save_sae(sae, tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    state = load_file(str(weights))
    name = sorted(state)[0]
    state[name] = state[name].to(torch.int32)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=rf"sae_weights.safetensors: {name} has dtype torch.int32; SAE weights must be floating point"):
        load_sae(tmp_path / "sae")


def test_local_paths_are_not_looked_up_on_the_hub(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory not found: a/b \(no such directory in a;"):
        resolve_model_dir("a/b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "d").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=r"^checkpoint c/d is a file, not a model directory$"):
        resolve_model_dir("c/d")


def test_unreachable_hub_dataset_is_a_data_error(monkeypatch) -> None:
    import datasets

    from bilinear_lens.data import corpus
    from bilinear_lens.data.corpus import load_texts

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/absent' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    # past the reachability probe (tested in test_corpus_access.py): the hub answers, the load fails
    monkeypatch.setattr(corpus, "check_hub_reachable", lambda name: None)
    with pytest.raises(ValueError, match=r"^corpus 'someone/absent' is not a local file and the hub dataset cannot be loaded "
                                         r"\(split 'train'\): ConnectionError: Couldn't reach"):
        load_texts("someone/absent", max_docs=2)


def test_sae_train_into_a_model_run_says_what_the_directory_holds(tmp_path) -> None:
    from bilinear_lens.sae.train import train_sae
    from fixtures.sae_recipe import recipe

    model_dir = tmp_path / "m"
    build_model(tiny_config(d_vocab=300, n_layers=1)).save_pretrained(model_dir)
    run = tmp_path / "model_run"  # a model training run's layout: run_config.toml and a checkpoint
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "checkpoints" / "step_000002" / "train_state.json").write_text("{}")
    (run / "run_config.toml").write_text("# a model run\n")
    with pytest.raises(FileExistsError, match=r"model_run already holds a model training run, not an SAE run \(latest step_000002\)"):
        train_sae(model_dir, run, recipe(tmp_path, steps=2), progress=False)
