"""Model configuration: one dataclass, validated on construction, loadable from JSON/TOML.

A bad value raises ``ValueError`` naming the field, the value and what is allowed, so a
typo in a recipe fails before any weights are built.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from bilinear_lens.models.mlp_kinds import ATTN_ONLY, MLP_KIND_NAMES, MLP_KINDS, mlp_kind_spec

# TransformerLens' names for the norm families ("Pre" = no learned scale, as in the paper);
# None = no norm at all (the paper's 1-layer TinyStories models). TOML has no null, so a
# recipe says "none", which the config stores as None.
NORMALIZATION_TYPES = ("RMS", "RMSPre", "LN", "LNPre", None)
NO_NORM_NAME = "none"
POSITIONAL_EMBEDDING_TYPES = ("rotary", "standard")
# ModelConfig.dtype (and SAEConfig.dtype) names -> torch dtypes; the one list of dtype names
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPES = tuple(TORCH_DTYPES)


def config_error(cls_name: str, field_name: str, value: Any, allowed: str) -> ValueError:
    """The error every config class raises for a bad value: names the field, the value and
    what is allowed (``ModelConfig.d_mlp=0 is invalid: must be a positive integer``)."""
    return ValueError(f"{cls_name}.{field_name}={value!r} is invalid: {allowed}")


def is_int(value: Any) -> bool:
    """An int that is not a bool (``True`` would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise config_error("ModelConfig", field_name, value, allowed)


def _positive_int(name: str, value: Any) -> None:
    if not is_int(value) or value <= 0:
        _fail(name, value, "must be a positive integer")


@dataclass
class ModelConfig:
    """Architecture of a small decoder-only transformer whose MLP kind is one value.

    Attributes follow TransformerLens (``d_model``, ``d_mlp``, ``n_layers``, ``n_heads``,
    ``d_head``, ``d_vocab``, ``n_ctx``, ``normalization_type``,
    ``positional_embedding_type``). ``mlp_kind`` picks the MLP of every block:
    ``bilinear`` (GLU without activation), ``swiglu``, ``relu``, ``gelu``, ``linear``
    (no activation, not gated) or ``none`` (attention-only). Every kind uses the same
    dims and the same init rule, so they compare fairly; note that gated kinds have
    3 ``d_model x d_mlp`` matrices and plain kinds 2 (pick ``d_mlp`` accordingly for
    equal parameter counts, see :meth:`with_matched_params`).
    """

    d_vocab: int = 4096
    d_model: int = 64
    n_layers: int = 1
    n_heads: int = 4
    d_mlp: Optional[int] = None  # None -> 4 * d_model
    n_ctx: int = 256
    mlp_kind: str = "bilinear"
    normalization_type: Optional[str] = "RMSPre"
    positional_embedding_type: str = "rotary"
    rotary_base: float = 10000.0
    mlp_bias: bool = False
    attn_bias: bool = False
    eps: float = 1e-5
    init_range: float = 0.02
    seed: int = 0
    dtype: str = "float32"
    d_head: int = field(init=False)

    def __post_init__(self) -> None:
        if self.d_mlp is None:
            self.d_mlp = 4 * self.d_model
        for name in ("d_vocab", "d_model", "n_layers", "n_heads", "d_mlp", "n_ctx"):
            _positive_int(name, getattr(self, name))
        if self.d_model % self.n_heads != 0:
            _fail("d_model", self.d_model, f"must be divisible by n_heads={self.n_heads}")
        self.d_head = self.d_model // self.n_heads
        if self.normalization_type == NO_NORM_NAME:
            self.normalization_type = None
        if self.mlp_kind not in MLP_KIND_NAMES:
            _fail("mlp_kind", self.mlp_kind, f"allowed values are {list(MLP_KIND_NAMES)}")
        if self.normalization_type not in NORMALIZATION_TYPES:
            _fail("normalization_type", self.normalization_type, f"allowed values are {list(NORMALIZATION_TYPES[:-1])} or 'none' (null)")
        if self.positional_embedding_type not in POSITIONAL_EMBEDDING_TYPES:
            _fail(
                "positional_embedding_type",
                self.positional_embedding_type,
                f"allowed values are {list(POSITIONAL_EMBEDDING_TYPES)}",
            )
        if self.positional_embedding_type == "rotary" and self.d_head % 2 != 0:
            _fail("d_model", self.d_model, f"rotary embeddings need an even d_head, got d_head={self.d_head}")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"allowed values are {list(DTYPES)}")
        for name in ("eps", "init_range", "rotary_base"):
            value = getattr(self, name)
            if not is_number(value) or not value > 0:
                _fail(name, value, "must be a positive number")
        for name in ("mlp_bias", "attn_bias"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        if not is_int(self.seed):
            _fail("seed", self.seed, "must be an integer")

    # ---- what TransformerLens' own ``transformer_lens.patching`` reads from ``model.cfg`` ----
    @property
    def device(self) -> None:
        """``None``: the config does not track where the weights live. TransformerLens'
        patching functions allocate their result buffer with ``device=model.cfg.device``;
        ``None`` is torch's default device (results from another device are copied in)."""
        return None

    @property
    def n_key_value_heads(self) -> None:
        """``None``: every attention layer has ``n_heads`` key/value heads (no GQA), as
        TransformerLens' patching functions expect from ``cfg.n_key_value_heads``."""
        return None

    @property
    def attn_only(self) -> bool:
        return self.mlp_kind == ATTN_ONLY

    @property
    def gated(self) -> bool:
        return not self.attn_only and mlp_kind_spec(self.mlp_kind).gated

    def mlp_params_per_layer(self) -> int:
        """Weights in one MLP (biases excluded): 3 matrices if gated, 2 if plain, 0 if none."""
        n_mats = 0 if self.attn_only else mlp_kind_spec(self.mlp_kind).n_matrices
        assert self.d_mlp is not None
        return n_mats * self.d_model * self.d_mlp

    def with_matched_params(self, mlp_kind: str) -> "ModelConfig":
        """A copy with ``mlp_kind`` changed and ``d_mlp`` rescaled so the MLP has (about)
        the same parameter count as this config's MLP (gated <-> plain: x 3/2 or x 2/3)."""
        target = self.mlp_params_per_layer()
        if mlp_kind not in MLP_KINDS:  # "none" keeps d_mlp; an unknown kind fails validation
            return self.replace(mlp_kind=mlp_kind)
        n_mats = mlp_kind_spec(mlp_kind).n_matrices
        d_mlp = max(1, round(target / (n_mats * self.d_model)))
        return self.replace(mlp_kind=mlp_kind, d_mlp=d_mlp)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A validated copy with ``changes`` applied (unknown names raise ValueError)."""
        data = self.to_dict()
        data.update(changes)
        return ModelConfig.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("d_head")  # derived
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "model config") -> "ModelConfig":
        """Build from a mapping; an unknown key raises ValueError naming it and ``where``."""
        allowed = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - allowed - {"d_head"})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in {where}; allowed keys: {sorted(allowed)}")
        cfg = cls(**{k: v for k, v in data.items() if k in allowed})
        if "d_head" in data and data["d_head"] != cfg.d_head:
            raise ValueError(
                f"d_head={data['d_head']} in {where} disagrees with d_model/n_heads={cfg.d_head}"
            )
        return cfg

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Load from ``.json`` or ``.toml`` (a TOML file may nest it under ``[model]``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(text)
                data = data.get("model", data)
            else:
                data = json.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
            raise ValueError(f"cannot parse model config {path}: {err}") from err
        if not isinstance(data, dict):
            raise ValueError(f"model config {path} must hold a mapping, got {type(data).__name__}")
        return cls.from_dict(data, where=str(path))


