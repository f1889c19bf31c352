"""SAEs trained by SAELens on our HF export name HF modules (``model.layers.0.mlp``): SAELens'
``HookedProxyLM`` hooks a module's output (the first element of a tuple). Where our model has
a hook holding the same tensor, ``load_sae(model=ours)`` maps the name; otherwise the error says
what is nearest (issue #21 item 7)."""

from __future__ import annotations

import pytest
import torch

from bilinear_lens.models.hook_names import _HF_EXACT, hf_hook_equivalent
from bilinear_lens.sae.config import SAEConfig, SAEConfigError
from bilinear_lens.sae.model import SAE, load_sae, save_sae
from fixtures.llama_export import HF_VS_OURS, export_model, tokens


def hf_module_outputs(path, toks: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """What SAELens' ``get_hook_fn`` sees on ``AutoModelForCausalLM``: each module's output,
    or its first element when the output is a tuple."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32).eval()
    modules, seen = dict(hf.named_modules()), {}
    for name in names:
        modules[name].register_forward_hook(
            lambda m, i, out, name=name: seen.__setitem__(name, (out[0] if isinstance(out, tuple) else out).detach()))
    with torch.no_grad():
        hf(toks)
    return seen


@pytest.mark.parametrize("overrides", [dict(normalization_type="RMSPre"), dict(mlp_kind="swiglu")],
                         ids=["bilinear-rmspre", "swiglu-rms"])
def test_every_mapped_name_is_the_same_tensor(tmp_path, overrides):
    model, path = export_model(tmp_path, **overrides)
    toks = tokens(model)
    names = [p.replace("{l}", str(l)) for p in _HF_EXACT for l in range(model.cfg.n_layers)]
    names = list(dict.fromkeys(names))
    mapped = {n: hf_hook_equivalent(n, model)[0] for n in names}
    exact = {n: ours for n, ours in mapped.items() if ours is not None}
    # conditional entries hold only where they are exact
    assert ("model.layers.0.mlp.act_fn" in exact) == (model.cfg.mlp_kind == "bilinear")
    assert ("model.norm" in exact) == (model.cfg.normalization_type == "RMSPre")
    hf = hf_module_outputs(path, toks, list(exact))
    with torch.no_grad():
        _, cache = model.run_with_cache(toks)
    for name, ours in exact.items():
        assert hf[name].shape == cache[ours].shape, name
        assert (hf[name] - cache[ours]).abs().max().item() <= HF_VS_OURS, (name, ours)  # transformers' forward vs ours


def _sae(hook: str, d_in: int) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=3 * d_in, hook_name=hook, k=4, metadata={"model_name": "export/tiny"}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return sae


def test_load_sae_maps_an_hf_name_and_encodes_what_saelens_would(tmp_path):
    model, path = export_model(tmp_path)
    save_sae(_sae("model.layers.1.mlp", model.cfg.d_model), tmp_path / "sae")
    sae = load_sae(tmp_path / "sae", model=model)
    assert sae.cfg.hook_name == "blocks.1.hook_mlp_out" and sae.cfg.metadata["hf_hook_name"] == "model.layers.1.mlp"
    assert load_sae(tmp_path / "sae").cfg.hook_name == "model.layers.1.mlp"  # without a model: as written
    toks = tokens(model)
    saelens_input = hf_module_outputs(path, toks, ["model.layers.1.mlp"])["model.layers.1.mlp"]
    with torch.no_grad():
        ours = sae.feature_acts(model, toks)
        theirs = sae.encode(saelens_input)
    assert torch.equal(ours > 0, theirs > 0)
    assert (ours - theirs).abs().max().item() <= 10 * HF_VS_OURS  # the input's bound through a 0.3-scale encoder
    save_sae(sae, tmp_path / "again")  # our name is written, the HF one kept
    assert load_sae(tmp_path / "again").cfg.metadata["hf_hook_name"] == "model.layers.1.mlp"


@pytest.mark.parametrize("hook, message", [
    ("model.layers.0.self_attn.q_proj", "no hook here equals it; the nearest is blocks.0.attn.hook_q reshaped"),
    ("model.layers.1.input_layernorm", "the nearest is blocks.1.ln1.hook_normalized times blocks.1.ln1.weight"),
    ("model.layers.7.mlp", "its equivalent blocks.7.hook_mlp_out is not a hook of this model"),
])
def test_hf_names_without_an_exact_hook_say_what_is_nearest(tmp_path, hook, message):
    model, _ = export_model(tmp_path)  # RMS with weights: input_layernorm is not ln1.hook_normalized
    save_sae(_sae(hook, model.cfg.d_model), tmp_path / "sae")
    with pytest.raises(SAEConfigError) as err:
        load_sae(tmp_path / "sae", model=model)
    text = str(err.value)
    assert f"field hook_name={hook!r} is a Hugging Face Llama module name; " in text and message in text
    assert "\n" not in text


def test_other_unknown_names_keep_the_close_match_error(tmp_path):
    model, _ = export_model(tmp_path)
    save_sae(_sae("blocks.0.hook_mlp_outt", model.cfg.d_model), tmp_path / "sae")
    with pytest.raises(SAEConfigError, match=r"field hook_name='blocks.0.hook_mlp_outt': unknown hook name .*did you mean"):
        load_sae(tmp_path / "sae", model=model)
