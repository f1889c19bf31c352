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
then ReLU, as SAELens' ``TopKSAE``, with its ``rescale_acts_by_decoder_norm``: pre-activations
times ``|W_dec[i]|`` before the top-k, feature activations divided by it before decoding);
``normalize_activations`` ``"none"``,
``"constant_norm_rescale"`` and ``"layer_norm"`` (applied at run time). Gated, JumpReLU,
``expected_average_only_in`` (a dataset scale that SAELens folds into the weights first),
per-head hooks and ``hook_z`` reshaping are refused with an error naming the field.

Every field SAELens 6.x writes (read from ``sae_lens/saes/*.py``, ``llm_sae_training_runner.py``
and ``loading/pretrained_sae_loaders.py``, SAELens 6.18) is honoured, ignored because it
cannot change ``encode``/``decode`` (:data:`IGNORED_FIELDS`, each with its reason), or
refused naming it; in the >= 6 layout an unknown top-level field is refused too (it may be a
new field that changes the computation). The pre-6 flat layout mixed the whole training
runner's config into ``cfg.json``; there, as in SAELens' own ``handle_pre_6_0_config``, fields
other than the SAE's are dropped, so we compute what SAELens 6 computes from the same file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from bilinear_lens.files.names import SAE_CFG_FILE
from bilinear_lens.models.config import TORCH_DTYPES

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
    rescale_acts_by_decoder_norm: bool = False

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
        if not isinstance(self.rescale_acts_by_decoder_norm, bool):
            raise SAEConfigError(f"rescale_acts_by_decoder_norm must be true or false, got {self.rescale_acts_by_decoder_norm!r}")
        if self.rescale_acts_by_decoder_norm and self.architecture != "topk":
            raise SAEConfigError("rescale_acts_by_decoder_norm=true is only meaningful for architecture='topk'")
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
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        return out


_PRE_6_RENAMES = {"hook_point": "hook_name", "hook_point_head_index": "hook_head_index", "activation_fn_str": "activation_fn"}
# SAELens metadata (``LLM_METADATA_KEYS`` and what ``_set_sae_metadata`` writes) kept verbatim in
# SAEConfig.metadata: they describe the model and data the SAE was trained on, never enter
# encode/decode. hook_name, hook_head_index and the version fields are read (or written) apart.
_KNOWN_METADATA = (
    "model_name", "model_class_name", "model_from_pretrained_kwargs", "context_size", "dataset_path",
    "prepend_bos", "exclude_special_tokens", "seqpos_slice", "sequence_separator_token",
    "disable_concat_sequences", "neuronpedia_id",
    "hf_hook_name",  # ours: the HF module name an SAE was trained on (sae.model.hf_hook_name_mapped)
)
_STRUCTURAL = ("d_in", "d_sae", "hook_name", "dtype", "architecture", "k", "apply_b_dec_to_input",
               "normalize_activations", "reshape_activations", "hook_head_index", "rescale_acts_by_decoder_norm",
               "activation_fn", "activation_fn_kwargs")
# Fields SAELens 6.x writes that cannot change encode/decode, with the reason.
IGNORED_FIELDS: dict[str, str] = {
    "device": "where SAELens puts the tensors; we load on CPU and the caller moves the module",
    "sae_lens_version": "selects the layout, which _flatten reads either way",
    "sae_lens_training_version": "the trainer's version, provenance only",
    # TrainingSAEConfig fields, in the cfg.json of the trainer's mid-run checkpoints (save_model)
    "decoder_init_norm": "initialisation only",
    "l1_coefficient": "a loss coefficient (standard training)",
    "lp_norm": "a loss norm (standard training)",
    "l1_warm_up_steps": "a loss schedule (standard training)",
    "aux_loss_coefficient": "a loss coefficient (top-k training)",
    "use_sparse_activations": "sparse or dense storage of the same top-k activations",
    # pre-6 defaults that SAELens' handle_pre_6_0_config adds, then drops
    "dataset_trust_remote_code": "how the training data was downloaded",
}


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


def _is_pre_6(raw: Mapping[str, Any]) -> bool:
    """SAELens' own rule (``handle_config_defaulting``): the pre-6 layout unless a
    ``sae_lens_version`` >= 6 is recorded (top level or in ``metadata``)."""
    version = raw.get("sae_lens_version") or (raw.get("metadata") or {}).get("sae_lens_version")
    try:
        return not version or int(str(version).split(".")[0]) < 6
    except ValueError:
        return True


def _check_fields(raw: Mapping[str, Any], flat: Mapping[str, Any]) -> None:
    """Refuse what would change results and we do not compute (module docstring)."""
    for name in ("hook_name_out", "hook_head_index_out"):
        if flat.get(name) is not None:
            raise SAEConfigError(f"{name}={flat[name]!r}: transcoders (an output hook) are not supported")
    if flat.get("finetuning_scaling_factor"):
        raise SAEConfigError("finetuning_scaling_factor=true is not supported (fold the scaling factor into W_dec first)")
    if _is_pre_6(raw):
        return  # SAELens itself drops the runner's other fields (handle_pre_6_0_config)
    known = set(_STRUCTURAL) | set(_KNOWN_METADATA) | set(IGNORED_FIELDS) | {"finetuning_scaling_factor", "hook_name_out", "hook_head_index_out"}
    unknown = sorted(k for k in raw if k != "metadata" and k not in known)
    if unknown:
        raise SAEConfigError(f"unknown field(s) {unknown}: not a field of SAELens' standard/topk SAE configs, "
                             "so we cannot tell whether it changes encode/decode")


def sae_config_from_dict(raw: Any) -> SAEConfig:
    """Parse a ``cfg.json`` object in either SAELens layout (see module docstring)."""
    if not isinstance(raw, Mapping):
        raise SAEConfigError(f"must be a JSON object, got {type(raw).__name__}")
    flat = _flatten(raw)
    _check_fields(raw, flat)
    missing = [name for name in ("d_in", "d_sae", "hook_name", "dtype") if flat.get(name) is None]
    if missing:
        raise SAEConfigError(f"missing field(s) {missing}")
    if flat.get("hook_head_index") is not None:
        raise SAEConfigError(f"hook_head_index={flat['hook_head_index']!r}: per-head SAEs are not supported")
    if flat.get("reshape_activations", "none") != "none":
        raise SAEConfigError(f"reshape_activations={flat['reshape_activations']!r} is not supported; allowed: 'none'")
    architecture, k = _architecture_and_k(flat)
    dtype = str(flat["dtype"]).removeprefix("torch.")
    normalize = flat.get("normalize_activations", "none")
    if isinstance(normalize, bool):  # pre-6: true meant the dataset-wide scale (SAELens' reading)
        normalize = "expected_average_only_in" if normalize else "none"
    return SAEConfig(
        d_in=flat["d_in"],
        d_sae=flat["d_sae"],
        hook_name=flat["hook_name"],
        architecture=architecture,
        k=k,
        apply_b_dec_to_input=flat.get("apply_b_dec_to_input", True),
        normalize_activations=normalize or "none",
        dtype=dtype,
        metadata={key: flat[key] for key in _KNOWN_METADATA if key in flat},
        # SAELens' TopKSAEConfig default is false (its *training* config's is true, always written);
        # true on a standard SAE is refused by SAEConfig
        rescale_acts_by_decoder_norm=flat.get("rescale_acts_by_decoder_norm", False),
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
