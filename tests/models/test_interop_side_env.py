"""The HF export read by the oldest transformers it claims to support (4.57, what
circuit-tracer's environment has), in a side virtual environment (issue #21 items 3-4):
``AutoTokenizer`` loads it and encodes as we do, the config's RoPE base is ours, and
``AutoModelForCausalLM`` gives our logits.

Slow: the first run builds ``<cache>/transformers-4.57`` (``python -m venv
--system-site-packages`` reusing this torch, then ``pip install transformers==4.57.*`` from
the registry); later runs reuse it. The cache is ``$BILINEAR_LENS_SIDE_ENV_CACHE`` or
``~/.cache/bilinear-lens/side-envs``. Skipped, saying why, when pip cannot reach the registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures.llama_export import HF_VS_OURS, TEXTS, export_model, tokens

pytestmark = pytest.mark.slow

OLDEST_TRANSFORMERS = "4.57"
_NETWORK_WORDS = ("Could not find a version", "No matching distribution", "connection", "Connection", "Network",
                  "Temporary failure", "Name or service not known", "ProxyError", "Max retries")


def side_env(version: str) -> Path:
    """The side environment's python, built once (a marker file says it is complete)."""
    root = Path(os.environ.get("BILINEAR_LENS_SIDE_ENV_CACHE", Path.home() / ".cache" / "bilinear-lens" / "side-envs"))
    env = root / f"transformers-{version}"
    python = env / "bin" / "python"
    if (env / "complete").is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--clear", str(env)], check=True, timeout=300)
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           f"transformers=={version}.*"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).strip()
        if any(word in output for word in _NETWORK_WORDS):
            pytest.skip(f"pip cannot install transformers=={version}.* from the registry: {output.splitlines()[-1]}")
        raise AssertionError(f"building the side environment failed: {output[-2000:]}")
    (env / "complete").write_text(version + "\n")
    return python


READER = r"""
import json, sys, torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
path, texts, toks = sys.argv[1], json.loads(sys.argv[2]), torch.tensor(json.loads(sys.argv[3]))
tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
cfg = AutoConfig.from_pretrained(path, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(toks).logits
print(json.dumps({"version": transformers.__version__, "tokenizer": type(tok).__name__,
                  "ids": [tok(t)["input_ids"] for t in texts], "rope_theta": getattr(cfg, "rope_theta", None),
                  "logits": logits.tolist()}))
"""


def test_transformers_4_57_reads_the_export(tmp_path):
    python = side_env(OLDEST_TRANSFORMERS)
    model, path = export_model(tmp_path)
    toks = tokens(model)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(python), "-c", READER, str(path), json.dumps(TEXTS), json.dumps(toks.tolist())],
                          capture_output=True, text=True, env=env, cwd="/", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["version"].startswith(OLDEST_TRANSFORMERS + ".")
    assert out["tokenizer"] == "PreTrainedTokenizerFast"
    assert out["ids"] == [model.to_tokens(t)[0].tolist() for t in TEXTS]
    assert out["rope_theta"] == model.cfg.rotary_base == 500000.0
    with torch.no_grad():
        ours = model(toks)
    assert (torch.tensor(out["logits"]) - ours).abs().max().item() <= HF_VS_OURS  # transformers' forward vs ours
