"""The one load dispatch (issue #22 item 2): every format is read as data by
``models.loading`` and built once by ``models.model``; the paper's reader returns
``(config, state dict, tokenizer)`` like the HF Llama one.

The paper-layout directories here are written by inverting the documented name map
(``paper_checkpoints``' docstring) from one of our models, so loading them must give that
model back bit for bit: ``n_layers = 2`` makes the Oct-2024 attention-output scale
``sqrt(2 n_layers) = 2``, and multiplying then dividing a float32 by 2 is exact."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.models.config import DTYPES, TORCH_DTYPES, ModelConfig
from bilinear_lens.models.image_classifier import ImageClassifier, ImageClassifierConfig, read_image_config, save_image_classifier
from bilinear_lens.models.loading import MODEL_FORMATS, detect_model_format, read_model_files, save_model
from bilinear_lens.models.model import BilinearTransformer, build_model, load_model, load_paper_checkpoint, model_from_state_dict
from bilinear_lens.models.paper_checkpoints import read_paper_checkpoint
from conftest import REPO, tiny_config

PAPER_CONFIGS = {  # our config of the model written in their layout, and their config.json
    "oct2024": (dict(normalization_type="RMSPre", eps=1e-8),
                dict(bilinear=True, gate=None, bias=False, normalization=True, tokenizer="ts-4096")),
    "jun2024": (dict(normalization_type="RMS", eps=1e-8),
                dict(n_vocab=97, bilinear=True, gate=False, normalization=True, modifier="i5n")),
}


def word_tokenizer(n_vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of ``n_vocab`` words with ``[EOS]`` and no BOS (as theirs)."""
    vocab = {w: i for i, w in enumerate(["[EOS]"] + [f"w{i}" for i in range(1, n_vocab)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[EOS]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[EOS]")


def their_state_dict(model: BilinearTransformer, fmt: str) -> dict[str, torch.Tensor]:
    """``model``'s weights under the paper's names and layout (the docstring's map, inverted)."""
    cfg, ours = model.cfg, model.state_dict()
    d_head = cfg.d_head
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head))
    out = {"transformer.wte.weight": ours["embed.weight"], "lm_head.weight": ours["unembed.weight"]}
    for l in range(cfg.n_layers):
        b, h = f"blocks.{l}", f"transformer.h.{l}"
        out[f"{h}.attn.qkv.weight"] = torch.cat([ours[f"{b}.attn.{p}.weight"] for p in "qkv"])
        o = ours[f"{b}.attn.o.weight"]
        out[f"{h}.attn.o.weight"] = o * math.sqrt(2 * cfg.n_layers) if fmt == "oct2024" else o
        out[f"{h}.attn.rotary.inv_freq"] = inv_freq
        out[f"{h}.mlp.w.weight"] = torch.cat([ours[f"{b}.mlp.gate.weight"], ours[f"{b}.mlp.in.weight"]])
        out[f"{h}.mlp.{'p' if fmt == 'oct2024' else 'o'}.weight"] = ours[f"{b}.mlp.out.weight"]
    if fmt == "jun2024":
        norms = {f"transformer.h.{l}.n{i}": f"blocks.{l}.ln{i}" for l in range(cfg.n_layers) for i in (1, 2)}
        for theirs, mine in {**norms, "transformer.n_f": "ln_final"}.items():
            out[f"{theirs}.norm.weight"] = ours[f"{mine}.weight"]
            out[f"{theirs}.norm.bias"] = torch.zeros(cfg.d_model)  # their frozen zero bias
    return {k: v.clone().contiguous() for k, v in out.items()}


def paper_model(fmt: str) -> BilinearTransformer:
    """A tiny model their layout ``fmt`` expresses (seed 0: their configs have none), norm
    weights away from one (June-2024)."""
    model = build_model(tiny_config(**PAPER_CONFIGS[fmt][0]), tokenizer=word_tokenizer(97))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    return model.eval()


def write_paper_dir(path: Path, model: BilinearTransformer, fmt: str) -> Path:
    cfg = model.cfg
    config = dict(n_head=cfg.n_heads, n_layer=cfg.n_layers, n_ctx=cfg.n_ctx, d_model=cfg.d_model, d_hidden=cfg.d_mlp,
                  architectures=["Transformer"], torch_dtype="float32", **PAPER_CONFIGS[fmt][1])
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(their_state_dict(model, fmt), str(path / "model.safetensors"), metadata={"format": "pt"})
    model.tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


def assert_same_model(loaded: BilinearTransformer, model: BilinearTransformer, tokens: torch.Tensor) -> None:
    assert loaded.cfg == model.cfg
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))


@pytest.mark.parametrize("kind", ["bilinear", "swiglu"])
@pytest.mark.parametrize("save_format, read_format", [("bilinear-lens", "bilinear-lens"), ("hf", "hf-llama")])
def test_ours_and_hf_llama_dirs_load_through_the_dispatch_to_the_same_model(kind, save_format, read_format, tmp_path, tokens):
    model = build_model(tiny_config(mlp_kind=kind, seed=3), tokenizer=word_tokenizer(97))
    path = save_model(model, tmp_path / "m", format=save_format)
    files = read_model_files(path)
    assert files.format == read_format and files.cfg == model.cfg and files.as_read is not None
    assert files.state.keys() == model.state_dict().keys()  # our names, whatever the file's
    assert_same_model(load_model(path), model, tokens)
    assert_same_model(BilinearTransformer.from_pretrained(path), model, tokens)


@pytest.mark.parametrize("fmt", ["oct2024", "jun2024"])
def test_paper_dirs_of_both_layouts_load_to_the_model_they_were_written_from(fmt, tmp_path, tokens):
    model = paper_model(fmt)
    path = write_paper_dir(tmp_path / "ckpt", model, fmt)
    assert read_model_files(path).format == "paper" and read_model_files(path).as_read is None
    for loaded in (load_model(path), BilinearTransformer.from_pretrained(path), load_paper_checkpoint(path)):
        assert_same_model(loaded, model, tokens)
        assert not loaded.training  # the paper's models load in eval mode, as before
        assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab() and loaded.tokenizer.pad_token == "[EOS]"


@pytest.mark.parametrize("fmt", ["oct2024", "jun2024"])
def test_read_paper_checkpoint_returns_data_that_builds_the_loaded_model(fmt, tmp_path, tokens):
    model = paper_model(fmt)
    path = write_paper_dir(tmp_path / "ckpt", model, fmt)
    cfg, state, tok = read_paper_checkpoint(path)
    assert type(cfg) is ModelConfig and type(state) is dict and isinstance(tok, PreTrainedTokenizerFast)
    assert all(type(t) is torch.Tensor for t in state.values())
    assert state.keys() == model.state_dict().keys()
    built = model_from_state_dict(cfg, state, tok, where=str(path / "model.safetensors")).eval()
    assert_same_model(built, load_paper_checkpoint(path), tokens)
    assert_same_model(built, model, tokens)
    cfg_alone, state_alone, no_tok = read_paper_checkpoint(path, with_tokenizer=False)
    assert no_tok is None and cfg_alone == cfg and all(torch.equal(state_alone[k], v) for k, v in state.items())


def test_detect_model_format_names_each_format():
    assert MODEL_FORMATS == ("bilinear-lens", "hf-llama", "paper")
    assert detect_model_format({"format": "bilinear-lens", "d_model": 8}, "c.json") == "bilinear-lens"
    assert detect_model_format({"model_type": "llama"}, "c.json") == "hf-llama"
    assert detect_model_format({"n_layer": 1, "n_head": 2, "d_hidden": 8, "model_type": ""}, "c.json") == "paper"
    # ours, so its reader names what is wrong (not an object, another format)
    assert detect_model_format([1, 2], "c.json") == detect_model_format({"format": "x", "model_type": "llama"}, "c.json") == "bilinear-lens"


def test_unknown_format_is_the_same_one_line_checkpoint_error(tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"d_model": 32, "n_layers": 2}))
    expected = f"{path / 'config.json'} has neither 'format' (bilinear-lens) nor 'model_type' (Hugging Face); cannot tell its format"
    for load in (load_model, BilinearTransformer.from_pretrained, read_model_files):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert str(info.value) == expected
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    assert str(info.value) == f"model config {path / 'config.json'} must be a JSON object"


def test_model_and_image_configs_share_one_format_check(tmp_path):
    image_dir = save_image_classifier(ImageClassifier(ImageClassifierConfig(image_shape=(4, 4), n_classes=3, d_mlp=8)), tmp_path / "clf")
    model_dir = build_model(tiny_config()).save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError) as info:
        load_model(image_dir)
    assert str(info.value) == (f"{image_dir / 'config.json'} is not a bilinear-lens config "
                               "(format='bilinear-lens-image-classifier', expected 'bilinear-lens')")
    with pytest.raises(CheckpointError) as info:
        read_image_config(model_dir)
    assert str(info.value) == (f"{model_dir / 'config.json'} is not an image classifier config "
                               "(format='bilinear-lens', expected 'bilinear-lens-image-classifier')")
    for directory, read in ((model_dir, load_model), (image_dir, read_image_config)):
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, "format_version": 2}))
        with pytest.raises(CheckpointError) as info:
            read(directory)
        assert str(info.value) == f"{directory / 'config.json'} has format_version=2; this version reads 1"


def test_save_model_refuses_an_unknown_format_before_writing(tmp_path):
    with pytest.raises(ValueError) as info:
        save_model(build_model(tiny_config()), tmp_path / "m", format="onnx")
    assert str(info.value) == "format='onnx' is invalid: allowed ['bilinear-lens', 'hf']"
    assert not (tmp_path / "m").exists()


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def test_formats_return_data_and_only_the_model_module_builds_models():
    models_dir = REPO / "bilinear_lens" / "models"
    for name in ("loading.py", "paper_checkpoints.py", "hf_llama.py", "checkpoint.py"):
        assert "bilinear_lens.models.model" not in _imported_modules(models_dir / name), name


def test_torch_dtypes_have_one_home_with_the_dtype_names():
    homes = [path.relative_to(REPO).as_posix() for path in (REPO / "bilinear_lens").rglob("*.py")
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
             if isinstance(node, ast.Assign) and any(getattr(t, "id", None) in ("TORCH_DTYPES", "DTYPES") for t in node.targets)]
    assert sorted(homes) == ["bilinear_lens/models/config.py"] * 2
    assert DTYPES == tuple(TORCH_DTYPES) and all(isinstance(v, torch.dtype) for v in TORCH_DTYPES.values())
