"""The HF export read by other versions and tools without silent wrong results (issue #21
items 2-4): the tokenizer class every transformers version resolves, the RoPE base in the
field transformers < 5 reads, and TransformerLens' bridge in processed-weights mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bilinear_lens.models.bridge import HFGatedMLPBridge, boot_export
from bilinear_lens.models.hf_llama import EXPORT_TOKENIZER_CLASS
from fixtures.llama_export import HF_VS_OURS, TEXTS, export_model, tokens


def test_tokenizer_class_is_one_every_transformers_reads(tmp_path):
    """``tokenizer_config.json`` names ``PreTrainedTokenizerFast`` (transformers 5 writes
    ``TokenizersBackend``, which ``AutoTokenizer`` < 5 refuses), and the installed
    ``AutoTokenizer`` still loads it and encodes exactly as our model does."""
    from transformers import AutoTokenizer

    model, path = export_model(tmp_path)
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == EXPORT_TOKENIZER_CLASS == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    assert [tok(t)["input_ids"] for t in TEXTS] == [model.to_tokens(t)[0].tolist() for t in TEXTS]


def _hf_logits(path: Path, toks: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(toks).logits


def test_rope_theta_is_written_where_transformers_4_reads_it(tmp_path):
    """``config.json`` carries the RoPE base as ``rope_theta`` too. With ``rope_parameters``
    removed (a config as transformers < 5 reads it), the model still runs with our base;
    without either field it would fall back to 10000, which changes the logits (so the
    check is not vacuous)."""
    model, path = export_model(tmp_path)
    config = json.loads((path / "config.json").read_text())
    assert config["rope_theta"] == 500000.0 and config["rope_parameters"]["rope_theta"] == 500000.0
    toks = tokens(model)
    with torch.no_grad():
        ours = model(toks)
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    (path / "config.json").write_text(json.dumps(legacy))
    assert (_hf_logits(path, toks) - ours).abs().max().item() <= HF_VS_OURS
    (path / "config.json").write_text(json.dumps({k: v for k, v in legacy.items() if k != "rope_theta"}))
    assert (_hf_logits(path, toks) - ours).abs().max().item() > 100 * HF_VS_OURS  # base 10000 is another model


@pytest.mark.parametrize("mlp_kind", ["bilinear", "swiglu"])
def test_boot_export_is_right_in_processed_weights_mode(tmp_path, mlp_kind):
    """``boot_export`` = ``boot_transformers`` whose gated MLPs keep the HF activation after
    ``enable_compatibility_mode()`` (weights folded and centred: logits move by a constant per
    position, so log-probabilities are compared). TransformerLens' own bridge turns the
    bilinear MLP into SwiGLU there."""
    from transformer_lens.model_bridge import TransformerBridge

    model, path = export_model(tmp_path, mlp_kind=mlp_kind)
    toks = tokens(model)
    with torch.no_grad():
        expected = model(toks).log_softmax(-1)
        bridge = boot_export(path)
        assert all(type(block.mlp) is HFGatedMLPBridge for block in bridge.blocks)
        assert (bridge(toks).log_softmax(-1) - expected).abs().max().item() <= HF_VS_OURS
        bridge.enable_compatibility_mode()
        logits, cache = bridge.run_with_cache(toks)
        assert (logits.log_softmax(-1) - expected).abs().max().item() <= HF_VS_OURS
        assert cache["blocks.0.mlp.hook_post"].shape[-1] == model.cfg.d_mlp
        plain = TransformerBridge.boot_transformers(str(path), device="cpu", dtype=torch.float32)
        plain.enable_compatibility_mode()
        tl_error = (plain(toks).log_softmax(-1) - expected).abs().max().item()
    if mlp_kind == "bilinear":  # the bug boot_export exists for (if this fails, TL fixed its fallback)
        assert tl_error > 0.1
    else:
        assert tl_error <= HF_VS_OURS
