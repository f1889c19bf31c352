"""SAE configuration and the SAELens on-disk format (``cfg.json``).

A saved SAE is a directory in SAELens' format (``sae_lens`` >= 6, which writes the
same files; its loader also reads the older flat layout, as we do)::

    cfg.json                  architecture, d_in, d_sae, dtype, device, apply_b_dec_to_input,
                              normalize_activations, reshape_activations, k (top-k only),
                              metadata {hook_name, model_name, context_size, ...,
                              sae_lens_version}
    sae_weights.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in]

Older SAELens versions (< 6) kept the metadata at the top level (``hook_name``,
``hook_point``) and named the activation ``activation_fn_str`` (``"relu"``/``"topk"``) with
``activation_fn_kwargs = {"k": ...}``; :func:`sae_config_from_dict` reads both. SAELens
picks the layout from ``sae_lens_version``, so we write ``metadata.sae_lens_version =
"6.0.0"`` as the *format* version (this package is not SAELens). Missing
``apply_b_dec_to_input``/``normalize_activations``/``architecture`` take SAELens' own
defaults (``True``, ``"none"``, ``"standard"``); every other field is required.

Supported: ``architecture`` ``"standard"`` (ReLU) and ``"topk"`` (top-``k`` pre-activations,
then ReLU, as SAELens' ``TopKSAE``); ``normalize_activations`` ``"none"``,
``"constant_norm_rescale"`` and ``"layer_norm"`` (applied at run time). Gated, JumpReLU,
``expected_average_only_in`` (a dataset scale that SAELens folds into the weights first),
per-head hooks and ``hook_z`` reshaping are refused with an error naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from bilinear_lens.files.names import SAE_CFG_FILE
from bilinear_lens.models.model import TORCH_DTYPES

SAE_LENS_FORMAT_VERSION = "6.0.0"
ARCHITECTURES = ("standard", "topk")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")


class SAEConfigError(ValueError):
    """A ``cfg.json`` (or SAE argument) that is missing a field or holds a bad value."""


@dataclass(frozen=True)
class SAEConfig:
    """An SAE on the activation ``hook_name`` (``[..., d_in]``) with ``d_sae`` features.

    ``architecture``: ``"standard"`` (``f = relu(W_enc^T x' + b_enc)``) or ``"topk"`` (the
    ``k`` largest pre-activations, through a ReLU; the rest 0), where ``x' = x - b_dec`` if
    ``apply_b_dec_to_input`` else ``x``. ``metadata``: the rest of SAELens' metadata
    (``model_name``, ``context_size``, ``dataset_path``, ``prepend_bos``), kept verbatim.
    """

    d_in: int
    d_sae: int
    hook_name: str
    architecture: str = "topk"
    k: Optional[int] = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SAEConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise SAEConfigError(f"hook_name must be a non-empty string, got {self.hook_name!r}")
        if self.architecture not in ARCHITECTURES:
            raise SAEConfigError(f"architecture={self.architecture!r} is not supported; allowed: {list(ARCHITECTURES)}")
        if self.architecture == "topk":
            if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= self.d_sae:
                raise SAEConfigError(f"k must be an integer in [1, d_sae={self.d_sae}] for a topk SAE, got {self.k!r}")
        elif self.k is not None:
            raise SAEConfigError(f"k={self.k!r} is only meaningful for architecture='topk'")
        if not isinstance(self.apply_b_dec_to_input, bool):
            raise SAEConfigError(f"apply_b_dec_to_input must be true or false, got {self.apply_b_dec_to_input!r}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEConfigError(
                f"normalize_activations={self.normalize_activations!r} is not supported; allowed: {list(NORMALIZATIONS)}"
                + (" (fold the scale into the weights first)" if self.normalize_activations == "expected_average_only_in" else "")
            )
        if self.dtype not in TORCH_DTYPES:
            raise SAEConfigError(f"dtype={self.dtype!r} is not supported; allowed: {list(TORCH_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]

    def to_sae_lens_dict(self) -> dict[str, Any]:
        """``cfg.json`` contents in SAELens >= 6's layout (see module docstring)."""
        out: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": "none",
            "metadata": {
                **dict(self.metadata),
                "hook_name": self.hook_name,
                "hook_head_index": None,
                "sae_lens_version": SAE_LENS_FORMAT_VERSION,
                "sae_lens_training_version": None,
            },
        }
        if self.architecture == "topk":
            out["k"] = self.k
        return out


_PRE_6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
_KNOWN_METADATA = ("model_name", "context_size", "dataset_path", "prepend_bos")


def _flatten(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One flat dict from either layout (``metadata`` entries and pre-6 names folded in)."""
    flat = {_PRE_6_RENAMES.get(k, k): v for k, v in raw.items() if k != "metadata"}
    metadata = raw.get("metadata")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise SAEConfigError(f"field metadata must be a JSON object, got {type(metadata).__name__}")
    for key, value in (metadata or {}).items():
        flat.setdefault(_PRE_6_RENAMES.get(key, key), value)
    return flat


def _architecture_and_k(flat: Mapping[str, Any]) -> tuple[str, Optional[int]]:
    architecture = flat.get("architecture", "standard")
    activation = flat.get("activation_fn", "relu")
    if architecture == "standard" and activation == "topk":  # pre-6 top-k layout
        architecture = "topk"
    elif architecture == "standard" and activation != "relu":
        raise SAEConfigError(f"activation_fn={activation!r} is not supported; allowed: 'relu', 'topk'")
    if architecture != "topk":
        return architecture, None
    if "k" in flat:
        return architecture, flat["k"]
    kwargs = flat.get("activation_fn_kwargs") or {}
    if "k" not in kwargs:
        raise SAEConfigError("a topk SAE needs field k (or activation_fn_kwargs.k)")
    return architecture, kwargs["k"]


def sae_config_from_dict(raw: Any) -> SAEConfig:
    """Parse a ``cfg.json`` object in either SAELens layout (see module docstring)."""
    if not isinstance(raw, Mapping):
        raise SAEConfigError(f"must be a JSON object, got {type(raw).__name__}")
    flat = _flatten(raw)
    missing = [name for name in ("d_in", "d_sae", "hook_name", "dtype") if flat.get(name) is None]
    if missing:
        raise SAEConfigError(f"missing field(s) {missing}")
    if flat.get("hook_head_index") is not None:
        raise SAEConfigError(f"hook_head_index={flat['hook_head_index']!r}: per-head SAEs are not supported")
    if flat.get("reshape_activations", "none") != "none":
        raise SAEConfigError(f"reshape_activations={flat['reshape_activations']!r} is not supported; allowed: 'none'")
    architecture, k = _architecture_and_k(flat)
    dtype = str(flat["dtype"]).removeprefix("torch.")
    return SAEConfig(
        d_in=flat["d_in"],
        d_sae=flat["d_sae"],
        hook_name=flat["hook_name"],
        architecture=architecture,
        k=k,
        apply_b_dec_to_input=flat.get("apply_b_dec_to_input", True),
        normalize_activations=flat.get("normalize_activations", "none") or "none",
        dtype=dtype,
        metadata={key: flat[key] for key in _KNOWN_METADATA if key in flat},
    )


def read_sae_config(directory: str | Path) -> SAEConfig:
    """Read ``directory/cfg.json``; every problem names the file and the field."""
    from bilinear_lens.files.serialized import read_json

    path = Path(directory) / SAE_CFG_FILE
    raw = read_json(path, what="SAE config")
    try:
        return sae_config_from_dict(raw)
    except SAEConfigError as err:
        raise SAEConfigError(f"{path}: {err}") from None
