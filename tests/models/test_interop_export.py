"""The HF export read by other versions and tools without silent wrong results (issue #21
items 2-4): the tokenizer class every transformers version resolves, the RoPE base in the
field transformers < 5 reads, and TransformerLens' bridge in processed-weights mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bilinear_lens.data.tokenizer import to_hf_tokenizer, train_tokenizer
from bilinear_lens.models.bridge import HFGatedMLPBridge, boot_export
from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.hf_llama import EXPORT_TOKENIZER_CLASS
from bilinear_lens.models.model import BilinearTransformer, build_model

TEXTS = ["once upon a time the dog ran", "lily was happy. the dog"]
# transformers' Llama forward vs ours on these logits (|logit| <~ 10): measured <= 4e-6;
# 1e-4 is the bound test_hf_export.py uses for the same comparison.
HF_VS_OURS = 1e-4


def tiny_tokenizer():
    return to_hf_tokenizer(train_tokenizer(["once upon a time the dog ran. lily was happy."] * 30, vocab_size=300))


def export_model(tmp_path: Path, **overrides) -> tuple[BilinearTransformer, Path]:
    """A tiny model with weights large enough that activations matter (init_range 0.3,
    RMSNorm weights away from 1, RoPE base 500000), exported to the HF Llama layout."""
    tok = tiny_tokenizer()
    cfg = ModelConfig(**{**dict(d_vocab=len(tok), d_model=32, n_layers=2, n_heads=4, d_mlp=48, n_ctx=16, seed=0,
                                normalization_type="RMS", rotary_base=500000.0, init_range=0.3), **overrides})
    model = build_model(cfg, tokenizer=tok).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
    return model, model.save_pretrained(tmp_path / "export", format="hf")


def tokens(model: BilinearTransformer) -> torch.Tensor:
    return torch.cat([model.to_tokens(t)[:, :8] for t in TEXTS])


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
