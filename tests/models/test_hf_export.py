"""Export to the Hugging Face Llama format: transformers and TransformerLens' own Llama
adapter load a trained tiny model with no code of ours and compute the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bilinear_lens.models.model import BilinearTransformer, build_model
from bilinear_lens.training.config import RunConfig
from bilinear_lens.training.loop import train
from conftest import tiny_config

TEXTS = ["Lily was not happy. The dog", "Tom found a red ball and"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> BilinearTransformer:
    """A 2-layer bilinear model (parameter-free RMSNorm, rotary) after 40 steps of training."""
    root = tmp_path_factory.mktemp("hf_export")
    recipe = {
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_mlp": 64, "n_ctx": 32, "seed": 0,
                  "normalization_type": "RMSPre", "rotary_base": 5000.0, "eps": 1e-6},
        "data": {"source": "synthetic", "vocab_size": 400, "max_docs": 1500, "val_fraction": 0.1,
                 "tokenizer_train_docs": 1500, "cache_dir": str(root / "cache")},
        "train": {"steps": 40, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
                  "log_every": 20, "eval_every": 0, "checkpoint_every": 0, "device": "cpu", "num_threads": 1},
    }
    result = train(RunConfig.from_dict(recipe, where="test recipe"), root / "run", progress=False)
    return BilinearTransformer.from_pretrained(result.final_checkpoint).eval()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    return trained.save_pretrained(tmp_path_factory.mktemp("hf") / "export", format="hf")


def _run_without_our_package(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh interpreter whose path cannot see ``bilinear_lens`` (it
    asserts that), and return the JSON it prints last."""
    guard = (
        "import sys, importlib.util\n"
        "sys.path = [p for p in sys.path if p not in ('', '.')]\n"
        "sys.meta_path.insert(0, type('Block', (), {'find_spec': staticmethod("
        "lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name.split('.')[0] == 'bilinear_lens' else None)})())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", guard + code, *args], capture_output=True, text=True, env=env, cwd="/", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_layout(exported):
    names = sorted(p.name for p in exported.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_act"] == "linear" and cfg["rms_norm_eps"] == 1e-6
    assert cfg["rope_parameters"]["rope_theta"] == 5000.0


def test_transformers_loads_export_with_same_logits_and_greedy_tokens(trained, exported, tmp_path):
    tokens = trained.to_tokens(TEXTS[0])
    prompt = trained.to_tokens("Lily was")
    ours_greedy = trained.generate(prompt, max_new_tokens=12, temperature=0, stop_at_eos=True)
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()\n"
        "assert not any(c.__module__.startswith('bilinear_lens') for c in type(m).__mro__)\n"
        "tokens = torch.tensor(json.loads(sys.argv[2]))\n"
        "prompt = torch.tensor(json.loads(sys.argv[3]))\n"
        "with torch.no_grad():\n"
        "    logits = m(tokens).logits\n"
        "    greedy = m.generate(prompt, max_new_tokens=12, do_sample=False)\n"
        "print(json.dumps({'logits': logits.tolist(), 'greedy': greedy.tolist(), 'cls': type(m).__name__}))\n"
    )
    out = _run_without_our_package(code, str(exported), json.dumps(tokens.tolist()), json.dumps(prompt.tolist()))
    assert out["cls"] == "LlamaForCausalLM"
    with torch.no_grad():
        ours = trained(tokens)
    diff = (torch.tensor(out["logits"]) - ours).abs().max().item()
    # measured 1.4e-6 (float32 rounding: Llama's rsqrt and float32 rotary tables vs our
    # x / sqrt and float64-built tables); the bound is the 1e-4
    assert diff <= 1e-4, diff
    assert ours.abs().max() > 1.0  # a trained model, not near-zero logits
    # transformers stops at EOS and pads only across a batch; one prompt gives equal sequences
    assert out["greedy"] == ours_greedy.tolist()


def test_exported_tokenizer_encodes_like_our_model(trained, exported):
    """``AutoTokenizer(text)`` and TransformerLens' ``to_tokens`` on the export give our
    ``model.to_tokens(text)``: BOS first (our default), exactly once; and the bridge's
    logits of the text equal ours."""
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoTokenizer\n"
        "from transformer_lens.model_bridge import TransformerBridge\n"
        "texts = json.loads(sys.argv[2])\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "b = TransformerBridge.boot_transformers(sys.argv[1], device='cpu', dtype=torch.float32)\n"
        "with torch.no_grad():\n"
        "    logits = b(texts[0])\n"
        "print(json.dumps({'hf': [tok(t)['input_ids'] for t in texts], 'tl': [b.to_tokens(t)[0].tolist() for t in texts],\n"
        "    'logits': logits.tolist()}))\n"
    )
    out = _run_without_our_package(code, str(exported), json.dumps(TEXTS))
    assert json.loads((exported / "tokenizer_config.json").read_text())["model_max_length"] == trained.cfg.n_ctx
    ours = [trained.to_tokens(t)[0].tolist() for t in TEXTS]
    assert ours[0][0] == trained.tokenizer.bos_token_id and ours[0][1] != ours[0][0]
    assert out["hf"] == ours and out["tl"] == ours
    with torch.no_grad():
        expected = trained(TEXTS[0])
    assert (torch.tensor(out["logits"]) - expected).abs().max().item() <= 1e-4  # float32 rounding as above


def test_transformer_lens_llama_adapter_loads_export(trained, exported):
    text = TEXTS[1]
    code = (
        "import json, sys, torch\n"
        "from transformer_lens.model_bridge import TransformerBridge\n"
        "b = TransformerBridge.boot_transformers(sys.argv[1], device='cpu', dtype=torch.float32)\n"
        "tokens = torch.tensor(json.loads(sys.argv[2]))\n"
        "with torch.no_grad():\n"
        "    logits, cache = b.run_with_cache(tokens)\n"
        "print(json.dumps({'logits': logits.tolist(), 'arch': b.cfg.architecture,\n"
        "    'pre': cache['blocks.1.mlp.hook_pre'].shape[-1], 'resid': cache['blocks.0.hook_resid_post'].tolist()}))\n"
    )
    tokens = trained.to_tokens(text)
    out = _run_without_our_package(code, str(exported), json.dumps(tokens.tolist()))
    assert out["arch"] == "LlamaForCausalLM"
    with torch.no_grad():
        ours, cache = trained.run_with_cache(tokens)
    # the bridge runs transformers' Llama forward: float32 rounding as above (1.4e-6)
    assert (torch.tensor(out["logits"]) - ours).abs().max().item() <= 1e-4
    assert out["pre"] == trained.cfg.d_mlp
    assert (torch.tensor(out["resid"]) - cache["blocks.0.hook_resid_post"]).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    "field, overrides",
    [
        ("positional_embedding_type", {"positional_embedding_type": "standard"}),
        ("normalization_type", {"normalization_type": "LN"}),
        ("normalization_type", {"normalization_type": None}),
        ("mlp_kind", {"mlp_kind": "relu"}),
        ("mlp_kind", {"mlp_kind": "linear"}),
        ("mlp_kind", {"mlp_kind": "none"}),
    ],
)
def test_inexpressible_configs_are_refused_and_nothing_written(field, overrides, tmp_path):
    model = build_model(tiny_config(**overrides))
    with pytest.raises(ValueError, match=rf"cannot export to the HF Llama format: ModelConfig\.{field}="):
        model.save_pretrained(tmp_path / "out", format="hf")
    assert list(tmp_path.iterdir()) == []


def test_unknown_save_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"format='onnx' is invalid: allowed \['bilinear-lens', 'hf'\]"):
        build_model(tiny_config()).save_pretrained(tmp_path / "out", format="onnx")
