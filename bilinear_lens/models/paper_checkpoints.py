"""The released checkpoints of Pearce et al. 2024 (``tdooms/bilinear-decomposition``) as our
config and state dict (:func:`read_paper_checkpoint`: data, as :mod:`~bilinear_lens.models.hf_llama`
gives; :mod:`bilinear_lens.models.model` builds the model).

Two layouts exist; both are ``transformers`` ``PreTrainedModel`` directories
(``config.json`` + ``model.safetensors``) with this module tree (``l`` = layer)::

    transformer.wte.weight            [d_vocab, d_model]          -> embed.weight
    transformer.h.l.attn.qkv.weight   [3 d_model, d_model]        -> attn.q/k/v.weight
                                       rows '(n n_head d_head)', n = q, k, v
    transformer.h.l.attn.o.weight     [d_model, d_model]          -> attn.o.weight
    transformer.h.l.attn.rotary.inv_freq [d_head / 2]             (checked: rotary base)
    transformer.h.l.mlp.w.weight      [2 d_hidden, d_model]       -> mlp.gate (first half, "left",
                                       the one the optional gate acts on), mlp.in (second half)
    transformer.h.l.mlp.{p|o}.weight  [d_model, d_hidden]         -> mlp.out.weight
    lm_head.weight                    [d_vocab, d_model]          -> unembed.weight

- **Oct-2024** (``src/language/transformer.py``, hub ids like ``tdooms/ts-medium``;
  tokenizer named by ``config.tokenizer``, e.g. ``ts-4096`` = ``tdooms/ts-tokenizer-4096``
  with pad ``[EOS]``): MLP output ``mlp.p``; ``Norm`` is a parameter-free RMSNorm with
  ``eps = 1e-8`` (``normalization: true``) or the identity; each layer computes
  ``x + attn(n1(x)) / sqrt(2 n_layer) + ...``, so the scale is folded into ``W_O``.
- **June-2024** (``language/model.py``, hub ids like ``tdooms/TinyStories-1-1024-i5n``;
  tokenizer ``tdooms/TinyStories-{n_vocab}``): MLP output ``mlp.o``; ``Norm`` is an
  RMSNorm with a learned weight (``n1.norm.weight``) and a bias that stays zero (checked),
  ``eps = 1e-8``, or nothing at all (``normalization: false/null``); no attention scale.
  The first June version's config says ``normalization: "rms" | "ln" | null`` with
  ``norm_bias`` and ``mlp_bias``: ``"ln"`` is ``nn.LayerNorm(d_model, norm_bias)``, whose
  second argument is *eps* (so eps = 0, or 1 with ``norm_bias: true``) with a learned weight
  and bias, our ``LN``; ``mlp_bias`` puts a bias on ``mlp.w`` only (``mlp.o`` has none, our
  out bias is zero); ``"rms"`` with a trained bias (``norm_bias: true``) is refused.

Both: rotary with base 10000 on ``d_head`` dims, rotate-half convention, scores scaled by
``1/sqrt(d_head)``, causal; no attention biases. ``bilinear: true`` with no gate is our
``bilinear`` MLP, with ``gate: "silu"`` our ``swiglu``; ``bilinear: false`` is a plain MLP
(``gate`` none/relu/gelu -> ``linear``/``relu``/``gelu``). Anything else raises a one-line
:class:`CheckpointError` naming the file and field. Their tokenizers have no BOS token:
the converted model does not prepend one by default (TransformerLens' rule).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from bilinear_lens.data.tokenizer import load_model_tokenizer
from bilinear_lens.files.names import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from bilinear_lens.files.serialized import CheckpointError, read_json, read_tensors
from bilinear_lens.models.config import TORCH_DTYPES, ModelConfig
from bilinear_lens.models.hub import resolve_model_dir

PAPER_EPS = 1e-8  # their RMSNorm's eps (shared/components.py)
# Their "ln" norm has eps 0 (nn.LayerNorm's second positional argument is eps: norm_bias=False),
# which ModelConfig refuses. In float32, var + 1e-12 == var for every var > 2e-5 (half an ulp
# of var exceeds 1e-12), so this eps gives their outputs bit for bit on any real residual.
PAPER_LN_ZERO_EPS = 1e-12
PAPER_ROTARY_BASE = 10000.0
# config.tokenizer (Oct-2024) -> (hub id, pad token), as their Transformer.get_tokenizer
PAPER_TOKENIZERS = {
    "ts-4096": ("tdooms/ts-tokenizer-4096", "[EOS]"),
    "gpt2": ("openai-community/gpt2", "<|endoftext|>"),
    "mistral": ("mistral-community/Mixtral-8x22B-v0.1", "</s>"),
}
PAPER_FORMATS = ("oct2024", "jun2024")


def is_paper_config(config: Any) -> bool:
    """Whether a parsed ``config.json`` is one of theirs (their ``Config`` fields, no
    ``model_type`` of a registered architecture, not ours)."""
    return (
        isinstance(config, dict)
        and {"n_layer", "n_head", "d_hidden"} <= set(config)
        and not config.get("model_type")
        and "format" not in config
    )


def detect_paper_format(state: Mapping[str, Tensor], where: str) -> str:
    """``"oct2024"`` (MLP output ``mlp.p``) or ``"jun2024"`` (``mlp.o``), from the tensor names."""
    if "transformer.h.0.mlp.p.weight" in state:
        return "oct2024"
    if "transformer.h.0.mlp.o.weight" in state:
        return "jun2024"
    raise CheckpointError(f"{where}: not a tdooms/bilinear-decomposition checkpoint (no transformer.h.0.mlp.p.weight or .o.weight)")


def _mlp_kind(bilinear: bool, gate: Any, where: str) -> str:
    """Their ``(bilinear, gate)`` pair as our ``mlp_kind``. June-2024 ``gate: true`` is a ReLU gate."""
    gate = "relu" if gate is True else (None if gate is False else gate)
    kinds = {(True, None): "bilinear", (True, "silu"): "swiglu", (False, None): "linear", (False, "relu"): "relu", (False, "gelu"): "gelu"}
    if (bool(bilinear), gate) not in kinds:
        raise CheckpointError(
            f"{where}: bilinear={bilinear!r} with gate={gate!r} has no bilinear-lens MLP kind; "
            "supported: bilinear with gate none/silu, non-bilinear with gate none/relu/gelu"
        )
    return kinds[(bool(bilinear), gate)]


def _field(config: Mapping[str, Any], name: str, where: str) -> Any:
    if name not in config:
        raise CheckpointError(f"{where}: missing field {name!r}")
    return config[name]


def _check_rotary(state: Mapping[str, Tensor], d_head: int, where: str) -> None:
    """Their rotary base is fixed at 10000; the saved ``inv_freq`` buffers must agree."""
    expected = 1.0 / (PAPER_ROTARY_BASE ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head))
    for name, tensor in state.items():
        if name.endswith("rotary.inv_freq") and not torch.allclose(tensor.float(), expected, rtol=1e-5, atol=0):
            raise CheckpointError(f"{where}: {name} is not the rotary frequencies of base {PAPER_ROTARY_BASE:g}")


def paper_model_config(config: Mapping[str, Any], state: Mapping[str, Tensor], fmt: str, where: str) -> ModelConfig:
    """Our :class:`ModelConfig` for one of their ``config.json`` files (``fmt`` from
    :func:`detect_paper_format`; ``d_vocab`` from the embedding's shape)."""
    n_layers, d_model = _field(config, "n_layer", where), _field(config, "d_model", where)
    mlp = config.get("mlp")  # some June-2024 hub configs say mlp: "blp" instead of bilinear: true
    if mlp is not None and mlp not in ("blp", "bilinear"):
        raise CheckpointError(f"{where}: mlp={mlp!r} is not supported; allowed: 'blp' (bilinear)")
    bilinear = True if mlp is not None else config.get("bilinear", True)
    norm, eps = _norm_type(config, fmt, where)
    if "transformer.wte.weight" not in state:
        raise CheckpointError(f"{where}: the weights have no transformer.wte.weight")
    try:
        cfg = ModelConfig(
            d_vocab=int(state["transformer.wte.weight"].shape[0]),
            d_model=d_model,
            n_layers=n_layers,
            n_heads=_field(config, "n_head", where),
            d_mlp=_field(config, "d_hidden", where),
            n_ctx=config.get("n_ctx", 256),
            mlp_kind=_mlp_kind(bilinear, config.get("gate"), where),
            normalization_type=norm,
            positional_embedding_type="rotary",
            rotary_base=PAPER_ROTARY_BASE,
            # Oct-2024 says "bias" (on mlp.w and mlp.p); June-2024 "mlp_bias" (on mlp.w only)
            mlp_bias=bool(config.get("bias" if fmt == "oct2024" else "mlp_bias", False)),
            eps=eps,
            dtype=_dtype_name(state["transformer.wte.weight"].dtype, where),
        )
    except CheckpointError:
        raise
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{where}: {err}") from err
    _check_rotary(state, cfg.d_head, where)
    return cfg


def _norm_type(config: Mapping[str, Any], fmt: str, where: str) -> tuple[Optional[str], float]:
    """Our ``(normalization_type, eps)`` for their ``normalization`` (and ``norm_bias``) fields."""
    value = config.get("normalization", True)
    if value is None or value is False:
        return None, PAPER_EPS
    if fmt == "oct2024":
        if value is not True:
            raise CheckpointError(f"{where}: normalization={value!r} is not supported for an Oct-2024 checkpoint; allowed: true, false, null")
        return "RMSPre", PAPER_EPS
    if value is True or value == "rms":
        return "RMS", PAPER_EPS
    if value == "ln":
        norm_bias = config.get("norm_bias", False)
        return "LN", float(norm_bias) if norm_bias else PAPER_LN_ZERO_EPS  # nn.LayerNorm(d_model, eps=norm_bias)
    raise CheckpointError(f"{where}: normalization={value!r} is not supported; allowed: true, false, null, 'rms', 'ln'")


def _dtype_name(dtype: torch.dtype, where: str) -> str:
    names = {v: k for k, v in TORCH_DTYPES.items()}
    if dtype not in names:
        raise CheckpointError(f"{where}: weights of dtype {dtype} are not supported; allowed: {sorted(TORCH_DTYPES)}")
    return names[dtype]


def _take(state: dict[str, Tensor], name: str, where: str) -> Tensor:
    if name not in state:
        raise CheckpointError(f"{where}: missing tensor {name}")
    return state.pop(name)


def _convert_norm(state: dict[str, Tensor], prefix: str, cfg: ModelConfig, where: str) -> dict[str, Tensor]:
    """June-2024 ``{prefix}.norm.weight`` -> ``{ours}.weight``; an RMSNorm's bias must be
    zero, a LayerNorm's (``normalization: "ln"``) is ``{ours}.bias``."""
    if cfg.normalization_type == "LN":
        return {"weight": _take(state, f"{prefix}.norm.weight", where), "bias": _take(state, f"{prefix}.norm.bias", where)}
    if cfg.normalization_type != "RMS":
        return {}
    bias = state.pop(f"{prefix}.norm.bias", None)
    if bias is not None and bool(bias.any()):
        raise CheckpointError(f"{where}: {prefix}.norm.bias is not zero (a trained RMSNorm bias: config norm_bias=true); "
                              "RMSNorm with a bias is not supported")
    return {"weight": _take(state, f"{prefix}.norm.weight", where)}


def _convert_layer(state: dict[str, Tensor], l: int, cfg: ModelConfig, fmt: str, where: str) -> dict[str, Tensor]:
    src, out = f"transformer.h.{l}", {}
    q, k, v = _take(state, f"{src}.attn.qkv.weight", where).chunk(3, dim=0)  # '(n n_head d_head)', n outermost
    out.update({"attn.q.weight": q, "attn.k.weight": k, "attn.v.weight": v})
    o = _take(state, f"{src}.attn.o.weight", where)
    out["attn.o.weight"] = o / math.sqrt(2 * cfg.n_layers) if fmt == "oct2024" else o  # their attention-output scale
    state.pop(f"{src}.attn.rotary.inv_freq", None)  # checked in paper_model_config
    out_name = "p" if fmt == "oct2024" else "o"
    w, p = _take(state, f"{src}.mlp.w.weight", where), _take(state, f"{src}.mlp.{out_name}.weight", where)
    if cfg.gated:
        out["mlp.gate.weight"], out["mlp.in.weight"] = w.chunk(2, dim=0)
    else:
        out["mlp.in.weight"] = w
    out["mlp.out.weight"] = p
    if cfg.mlp_bias:
        b = _take(state, f"{src}.mlp.w.bias", where)
        if cfg.gated:
            out["mlp.gate.bias"], out["mlp.in.bias"] = b.chunk(2, dim=0)
        else:
            out["mlp.in.bias"] = b
        if fmt == "oct2024":
            out["mlp.out.bias"] = _take(state, f"{src}.mlp.{out_name}.bias", where)
        else:  # June-2024 BLP: nn.Linear(d_hidden, d_model, bias=False) whatever mlp_bias says
            out["mlp.out.bias"] = torch.zeros_like(p[:, 0])
    for ours, theirs in (("ln1", "n1"), ("ln2", "n2")):
        out.update({f"{ours}.{k}": t for k, t in _convert_norm(state, f"{src}.{theirs}", cfg, where).items()})
    return {f"blocks.{l}.{k}": t.contiguous() for k, t in out.items()}


def convert_paper_state_dict(state: Mapping[str, Tensor], cfg: ModelConfig, fmt: str, where: str) -> dict[str, Tensor]:
    """Their state dict in our names (attention-output scale folded into ``W_O`` for
    Oct-2024). A tensor left over, or one missing, raises :class:`CheckpointError`."""
    if fmt not in PAPER_FORMATS:
        raise ValueError(f"fmt={fmt!r} is invalid: allowed {list(PAPER_FORMATS)}")
    rest = dict(state)
    out = {"embed.weight": _take(rest, "transformer.wte.weight", where), "unembed.weight": _take(rest, "lm_head.weight", where)}
    for l in range(cfg.n_layers):
        out.update(_convert_layer(rest, l, cfg, fmt, where))
    out.update({f"ln_final.{k}": t for k, t in _convert_norm(rest, "transformer.n_f", cfg, where).items()})
    if rest:
        raise CheckpointError(f"{where}: unexpected tensors {sorted(rest)} for a {fmt} checkpoint of this config")
    return out


def paper_tokenizer_id(config: Mapping[str, Any], fmt: str) -> tuple[Optional[str], str]:
    """(hub id, pad token) of the tokenizer their code loads for this config (``None`` if unnamed)."""
    if fmt == "oct2024":
        return PAPER_TOKENIZERS.get(config.get("tokenizer"), (None, "[EOS]"))
    return f"tdooms/TinyStories-{config.get('n_vocab', 4096)}", "[EOS]"


def read_paper_checkpoint(
    source: Union[str, Path], tokenizer: Union[str, Path, None] = None, with_tokenizer: bool = True
) -> tuple[ModelConfig, dict[str, Tensor], Any]:
    """``(our config, our state dict, tokenizer or None)`` of one of their checkpoint
    directories or hub ids, as :func:`~bilinear_lens.models.hf_llama.model_config_from_llama`
    and :func:`~bilinear_lens.models.hf_llama.from_llama_state_dict` give for a Llama
    directory; the model is built from it by :func:`bilinear_lens.models.model.load_paper_checkpoint`.

    ``tokenizer``: a directory or hub id holding their tokenizer (default: the checkpoint
    directory if it has ``tokenizer.json``, else the hub id their code uses, from the
    cache when offline). ``with_tokenizer=False`` converts the weights alone (``None``).
    """
    path = resolve_model_dir(source)
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    config = read_json(config_path, what="model config")
    state = read_tensors(weights_path, what="model weights")
    fmt = detect_paper_format(state, str(weights_path))
    cfg = paper_model_config(config, state, fmt, str(config_path))
    converted = convert_paper_state_dict(state, cfg, fmt, str(weights_path))
    tok = None
    if with_tokenizer:
        hub_id, pad = paper_tokenizer_id(config, fmt)
        tok_source = tokenizer or (path if (path / TOKENIZER_FILE).is_file() else hub_id)
        if tok_source is None:
            raise CheckpointError(f"{config_path}: tokenizer={config.get('tokenizer')!r} is not a known tokenizer; pass one")
        tok = load_model_tokenizer(resolve_model_dir(tok_source))
        if tok is None:
            raise CheckpointError(f"{tok_source}: no tokenizer.json")
        if tok.pad_token is None and pad in tok.get_vocab():
            tok.pad_token = pad
    return cfg, converted, tok
