"""The Hugging Face Llama format: our config and state dict <-> ``LlamaForCausalLM``'s.

A bilinear transformer with rotary positions, RMS (or parameter-free RMS) norms and
Llama-style biases *is* a ``LlamaForCausalLM`` whose ``hidden_act`` is ``"linear"``
(``transformers.ACT2FN["linear"]`` is the identity, so ``down(act(gate x) * up x)`` is
our ``out((gate x) * (in x))``); SwiGLU is ``"silu"``. Checked against
``transformers/models/llama/modeling_llama.py`` rather than assumed:

- attention scores are scaled by ``head_dim ** -0.5`` (ours: ``/ sqrt(d_head)``);
- rotary: ``inv_freq = 1 / base ** (arange(0, d_head, 2) / d_head)``, ``cos``/``sin`` of
  ``cat(freqs, freqs)`` and ``rotate_half(x) = cat(-x2, x1)`` (ours: the same);
- ``LlamaRMSNorm(x) = w * x * rsqrt(mean(x^2) + eps)`` with ``eps = rms_norm_eps``; a
  parameter-free RMSNorm is the weight-ones case.

Name map (``l`` = layer)::

    embed.weight                 model.embed_tokens.weight
    blocks.l.ln1.weight          model.layers.l.input_layernorm.weight        (ones if RMSPre)
    blocks.l.attn.{q,k,v,o}.*    model.layers.l.self_attn.{q,k,v,o}_proj.*
    blocks.l.ln2.weight          model.layers.l.post_attention_layernorm.weight
    blocks.l.mlp.gate.*          model.layers.l.mlp.gate_proj.*               (act(gate x))
    blocks.l.mlp.in.*            model.layers.l.mlp.up_proj.*
    blocks.l.mlp.out.*           model.layers.l.mlp.down_proj.*
    ln_final.weight              model.norm.weight
    unembed.weight               lm_head.weight

Our own export also writes our full config under :data:`SAVED_CONFIG_KEY` in
``config.json`` (transformers keeps unknown keys), so ours -> HF -> ours is exact
(``RMSPre`` stays parameter-free, ``seed``/``init_range`` survive).
"""

from __future__ import annotations

import copy
import math

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from bilinear_lens.data.tokenizer import save_model_tokenizer
from bilinear_lens.files.names import WEIGHTS_FILE
from bilinear_lens.files.serialized import CheckpointError, read_json, write_json, write_tensors
from bilinear_lens.models.checkpoint import SAVED_CONFIG_KEY, saved_config_metadata
from bilinear_lens.models.config import ModelConfig

LLAMA_ARCHITECTURE = "LlamaForCausalLM"
# The tokenizer class the export names: transformers 5 writes "TokenizersBackend", which
# AutoTokenizer < 5 cannot resolve (ValueError); every supported version reads this one.
EXPORT_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# mlp_kind <-> Llama hidden_act
HIDDEN_ACTS = {"bilinear": "linear", "swiglu": "silu"}
MLP_KINDS_BY_ACT = {act: kind for kind, act in HIDDEN_ACTS.items()}

# Llama config.json field -> our ModelConfig field, read in both directions
_LLAMA_FIELDS = {
    "vocab_size": "d_vocab",
    "hidden_size": "d_model",
    "intermediate_size": "d_mlp",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "max_position_embeddings": "n_ctx",
    "rms_norm_eps": "eps",
    "attention_bias": "attn_bias",
    "mlp_bias": "mlp_bias",
}
# fields a Llama config.json may leave out, with transformers' defaults
_LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "attention_bias": False, "mlp_bias": False}

_LAYER_NAMES = {
    "ln1.weight": "input_layernorm.weight",
    "ln2.weight": "post_attention_layernorm.weight",
    **{f"attn.{p}.{t}": f"self_attn.{p}_proj.{t}" for p in "qkvo" for t in ("weight", "bias")},
    **{f"mlp.{ours}.{t}": f"mlp.{theirs}_proj.{t}" for ours, theirs in (("gate", "gate"), ("in", "up"), ("out", "down")) for t in ("weight", "bias")},
}
_TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "ln_final.weight": "model.norm.weight", "unembed.weight": "lm_head.weight"}


def _llama_name(ours: str) -> str:
    if ours in _TOP_NAMES:
        return _TOP_NAMES[ours]
    _, layer, rest = ours.split(".", 2)  # blocks.{l}.{rest}
    return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"


# field -> (values Llama expresses exactly, how to say them)
_LLAMA_EXPRESSIBLE = {
    "positional_embedding_type": (("rotary",), "'rotary'"),
    "normalization_type": (("RMS", "RMSPre"), "'RMS' or 'RMSPre' (weight-ones RMSNorm)"),
    "mlp_kind": (tuple(HIDDEN_ACTS), "'bilinear' (hidden_act linear) or 'swiglu' (hidden_act silu)"),
}


def check_llama_expressible(cfg: ModelConfig) -> None:
    """Raise ``ValueError`` naming the first field Llama cannot express exactly."""
    for name, (allowed, said) in _LLAMA_EXPRESSIBLE.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ValueError(f"cannot export to the HF Llama format: ModelConfig.{name}={value!r}; Llama expresses only {said}")


def llama_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The ``LlamaConfig`` keyword arguments describing ``cfg`` (checked expressible)."""
    check_llama_expressible(cfg)
    return dict(
        **{theirs: getattr(cfg, ours) for theirs, ours in _LLAMA_FIELDS.items()},
        num_key_value_heads=cfg.n_heads,
        head_dim=cfg.d_head,
        hidden_act=HIDDEN_ACTS[cfg.mlp_kind],
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rotary_base)},
        tie_word_embeddings=False,
        architectures=[LLAMA_ARCHITECTURE],
        dtype=cfg.dtype,
        **{SAVED_CONFIG_KEY: cfg.to_dict()},
    )


def to_llama_state_dict(state: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Our state dict in Llama names; parameter-free norms become weight-ones RMSNorms."""
    check_llama_expressible(cfg)
    out = {_llama_name(k): v for k, v in state.items()}
    if cfg.normalization_type == "RMSPre":
        ones = torch.ones(cfg.d_model, dtype=state["embed.weight"].dtype)
        norms = [f"blocks.{l}.ln{i}.weight" for l in range(cfg.n_layers) for i in (1, 2)] + ["ln_final.weight"]
        out.update({_llama_name(n): ones.clone() for n in norms})
    return out


def from_llama_state_dict(state: Mapping[str, Tensor], cfg: ModelConfig, where: str) -> dict[str, Tensor]:
    """Inverse of :func:`to_llama_state_dict`; with ``cfg.normalization_type == "RMSPre"``
    the norm weights must be exactly ones (else :class:`CheckpointError` naming the tensor).
    Missing or unexpected tensors are named in Llama's names."""
    expected = set(llama_tensor_names(cfg))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        problems = ([f"missing tensors {missing}"] if missing else []) + ([f"unexpected tensors {unexpected}"] if unexpected else [])
        raise CheckpointError(f"{where} does not match its config.json: " + "; ".join(problems))
    ours_by_llama = {_llama_name(k): k for k in _our_names(cfg)}
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        ours = ours_by_llama.get(name, name)
        if cfg.normalization_type == "RMSPre" and ours.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
            if not bool((tensor == 1).all()):
                raise CheckpointError(f"{where}: {name} is not all ones, but the config says parameter-free RMSNorm (RMSPre)")
            continue
        out[ours] = tensor
    return out


def llama_tensor_names(cfg: ModelConfig) -> list[str]:
    """The tensors a Llama checkpoint of ``cfg`` holds (norm weights always; biases per config)."""
    wanted = ["ln1.weight", "ln2.weight"] + [f"attn.{p}.weight" for p in "qkvo"] + [f"mlp.{p}.weight" for p in ("gate", "in", "out")]
    wanted += [f"attn.{p}.bias" for p in "qkvo"] if cfg.attn_bias else []
    wanted += [f"mlp.{p}.bias" for p in ("gate", "in", "out")] if cfg.mlp_bias else []
    layers = [f"blocks.{l}.{name}" for l in range(cfg.n_layers) for name in wanted]
    return [_llama_name(n) for n in list(_TOP_NAMES) + layers]


def _our_names(cfg: ModelConfig) -> list[str]:
    """Every state-dict name a Llama-expressible model of ``cfg`` may have (norm weights
    and biases included, so they map whether present or not)."""
    layer = list(_LAYER_NAMES)
    return list(_TOP_NAMES) + [f"blocks.{l}.{name}" for l in range(cfg.n_layers) for name in layer]


def _get(hf: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in hf:
        raise CheckpointError(f"{where}: missing field {key!r}")
    return hf[key]


# Llama fields that must be integers >= 1 (checked before any arithmetic on them).
_LLAMA_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "max_position_embeddings")


def _check_counts(hf: Mapping[str, Any], where: str) -> None:
    """A one-line :class:`CheckpointError` naming the first of :data:`_LLAMA_COUNTS` (or a
    given ``num_key_value_heads`` / ``head_dim``) that is not an integer >= 1."""
    for key in _LLAMA_COUNTS + tuple(k for k in ("num_key_value_heads", "head_dim") if hf.get(k) is not None):
        value = _get(hf, key, where)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{where}: {key}={value!r} must be an integer >= 1")


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise CheckpointError(f"{where}: {key}={hf[key]!r} must be an object (e.g. {{\"rope_type\": \"default\", "
                                  f"\"rope_theta\": 10000.0}}) or null")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported; allowed: 'default'")
    field = "rope_parameters.rope_theta" if "rope_theta" in rope else "rope_theta"
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise CheckpointError(f"{where}: {field}={theta!r} must be a positive number")
    return float(theta)


def model_config_from_llama(hf: Mapping[str, Any], where: str) -> ModelConfig:
    """Our :class:`ModelConfig` for a Llama ``config.json`` (``where`` names the file in errors).

    Refused (one line naming the field): another ``model_type``, a ``hidden_act`` other
    than linear/silu, grouped-query attention, a ``head_dim`` other than
    ``hidden_size / num_attention_heads``, non-default rope scaling, tied embeddings.
    """
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise CheckpointError(f"{where}: model_type={model_type!r} is not supported; allowed: 'llama'")
    act = _get(hf, "hidden_act", where)
    if act not in MLP_KINDS_BY_ACT:
        raise CheckpointError(f"{where}: hidden_act={act!r} is not supported; allowed: {sorted(MLP_KINDS_BY_ACT)}")
    _check_counts(hf, where)
    n_heads = _get(hf, "num_attention_heads", where)
    d_model = _get(hf, "hidden_size", where)
    if hf.get("num_key_value_heads", n_heads) != n_heads:
        raise CheckpointError(f"{where}: num_key_value_heads={hf['num_key_value_heads']} != num_attention_heads={n_heads} (grouped-query attention is not supported)")
    if hf.get("head_dim") not in (None, d_model // n_heads):
        raise CheckpointError(f"{where}: head_dim={hf['head_dim']} is not supported; must be hidden_size/num_attention_heads={d_model // n_heads}")
    if hf.get("tie_word_embeddings", False):
        raise CheckpointError(f"{where}: tie_word_embeddings=true is not supported; the unembedding must be its own matrix")
    fields = {ours: hf.get(theirs, _LLAMA_DEFAULTS.get(theirs)) if theirs in _LLAMA_DEFAULTS else _get(hf, theirs, where)
              for theirs, ours in _LLAMA_FIELDS.items()}
    fields.update(
        mlp_kind=MLP_KINDS_BY_ACT[act],
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_base=_rope_theta(hf, where),
        dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
    )
    try:
        cfg = ModelConfig(**fields)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from err
    return _with_our_config(cfg, hf.get(SAVED_CONFIG_KEY), where)


def _with_our_config(cfg: ModelConfig, ours: Any, where: str) -> ModelConfig:
    """Our exported config (seed, RMSPre...) when present and consistent with the Llama fields."""
    if ours is None:
        return cfg
    try:
        recorded = ModelConfig.from_dict(ours, where=f"{where} ({SAVED_CONFIG_KEY})")
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {SAVED_CONFIG_KEY} is invalid: {err}") from err
    llama_view = recorded.replace(normalization_type="RMS", dtype=cfg.dtype, seed=cfg.seed, init_range=cfg.init_range)
    differing = [f for f in cfg.to_dict() if getattr(llama_view, f) != getattr(cfg, f)]
    if differing:
        raise CheckpointError(f"{where}: {SAVED_CONFIG_KEY} disagrees with the Llama fields on {differing}")
    return recorded


def write_llama_files(directory: Path, cfg: ModelConfig, state: Mapping[str, Tensor], tokenizer: Any = None) -> None:
    """``config.json``, ``generation_config.json`` (greedy by default), ``model.safetensors``
    (its metadata records our config) and the tokenizer files, into an existing directory."""
    from transformers import GenerationConfig, LlamaConfig

    special = {
        f"{t}_token_id": getattr(tokenizer, f"{t}_token_id", None) for t in ("bos", "eos", "pad")
    }
    LlamaConfig(**llama_config_dict(cfg), **special).save_pretrained(str(directory))
    # transformers 5 writes the RoPE base only inside rope_parameters; transformers < 5 reads
    # the top-level rope_theta and, without it, silently uses 10000.
    _update_json(directory / "config.json", rope_theta=float(cfg.rotary_base))
    GenerationConfig(do_sample=False, **special).save_pretrained(str(directory))
    from bilinear_lens.tensor_checksum import checksum_metadata  # verified by load_model

    llama_state = to_llama_state_dict(state, cfg)
    metadata = {"format": "pt", **saved_config_metadata(cfg.to_dict()), **checksum_metadata(llama_state)}  # transformers wants format "pt"
    write_tensors(directory / WEIGHTS_FILE, llama_state, metadata=metadata)
    if tokenizer is not None:
        save_model_tokenizer(_export_tokenizer(tokenizer, cfg.n_ctx), directory, full=True)  # AutoTokenizer needs tokenizer_config.json
        _update_json(directory / "tokenizer_config.json", tokenizer_class=EXPORT_TOKENIZER_CLASS)


def _update_json(path: Path, **fields: Any) -> None:
    """Set ``fields`` in the JSON object at ``path`` (a file of the directory being written)."""
    write_json(path, {**read_json(path, what="exported JSON file"), **fields})


def _export_tokenizer(tokenizer: Any, n_ctx: int) -> Any:
    """A copy of ``tokenizer`` as the HF export ships it: ``model_max_length`` is the
    model's ``n_ctx`` (transformers then warns about longer inputs, which the model cannot
    take), and a plain ``tokenizer(text)`` starts with its BOS token when it has one. Our
    model prepends BOS by default (``default_prepend_bos``), and Llama tokenizers add it
    themselves, so ``AutoTokenizer`` plus the exported model must give ``model(text)``;
    tokenizers without BOS (the paper's) get no BOS."""
    exported = copy.deepcopy(tokenizer)
    if hasattr(exported, "model_max_length"):
        exported.model_max_length = n_ctx
    if getattr(exported, "bos_token_id", None) is not None and getattr(exported, "add_bos_token", None) is False:
        exported.add_bos_token = True  # transformers rewrites the post-processor template
    return exported
