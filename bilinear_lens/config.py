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

MLP_KIND_NAMES = ("bilinear", "swiglu", "relu", "gelu", "linear", "none")
# TransformerLens' names for the norm families ("Pre" = no learned scale, as in the paper).
NORMALIZATION_TYPES = ("RMS", "RMSPre", "LN", "LNPre", None)
POSITIONAL_EMBEDDING_TYPES = ("rotary", "standard")
DTYPES = ("float32", "float64", "bfloat16", "float16")


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
        if self.mlp_kind not in MLP_KIND_NAMES:
            _fail("mlp_kind", self.mlp_kind, f"allowed values are {list(MLP_KIND_NAMES)}")
        if self.normalization_type not in NORMALIZATION_TYPES:
            _fail("normalization_type", self.normalization_type, f"allowed values are {list(NORMALIZATION_TYPES)}")
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

    @property
    def attn_only(self) -> bool:
        return self.mlp_kind == "none"

    @property
    def gated(self) -> bool:
        return self.mlp_kind in ("bilinear", "swiglu")

    def mlp_params_per_layer(self) -> int:
        """Weights in one MLP (biases excluded): 3 matrices if gated, 2 if plain, 0 if none."""
        n_mats = 0 if self.attn_only else (3 if self.gated else 2)
        assert self.d_mlp is not None
        return n_mats * self.d_model * self.d_mlp

    def with_matched_params(self, mlp_kind: str) -> "ModelConfig":
        """A copy with ``mlp_kind`` changed and ``d_mlp`` rescaled so the MLP has (about)
        the same parameter count as this config's MLP (gated <-> plain: x 3/2 or x 2/3)."""
        target = self.mlp_params_per_layer()
        n_mats = 3 if mlp_kind in ("bilinear", "swiglu") else 2
        d_mlp = self.d_mlp if mlp_kind == "none" else max(1, round(target / (n_mats * self.d_model)))
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


# --- training recipes --------------------------------------------------------------------
#
# A recipe is a TOML file with three tables, each validated by a dataclass below:
#
#     [model]   ModelConfig   architecture (d_vocab may be left out: it is then the
#                             tokenizer's vocabulary size, known once the data is ready)
#     [data]    DataConfig    corpus, tokenizer, split, token cache
#     [train]   TrainConfig   optimizer, schedule, batch, eval/checkpoint cadence, device
#
# ``load_run_config(path, overrides)`` reads it, applies ``--set section.key=value``
# overrides and validates everything; every error names the key, the section and the file.

SCHEDULES = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")
AUTOCAST_DTYPES = ("none", "bfloat16")  # float16 would need a GradScaler


@dataclass
class DataConfig:
    """Where the training tokens come from (see :func:`bilinear_lens.data.prepare_data`).

    ``source``: ``"synthetic"`` (built-in stories), a local ``.txt``/``.jsonl``/``.json``/
    ``.parquet`` file (relative paths are resolved against the working directory), or a
    Hugging Face hub dataset name such as ``"roneneldan/TinyStories"``. ``tokenizer``: path
    to a ``tokenizer.json``, or ``""`` to train a byte-level BPE of ``vocab_size`` on the
    training documents. ``seed`` seeds the synthetic corpus and the train/val split (the
    batch order is seeded by ``train.seed``).
    """

    source: str = "synthetic"
    tokenizer: str = ""
    vocab_size: int = 4096
    split: str = "train"
    text_column: str = "text"
    val_fraction: float = 0.05
    seed: int = 0
    max_docs: int = 0  # 0: no limit (the endless synthetic source then yields 100k stories)
    max_chars: int = 0  # 0: no limit
    tokenizer_train_docs: int = 100_000  # 0: train the BPE on all training documents
    streaming: bool = False  # stream a hub dataset instead of downloading it first
    cache_dir: str = "data_cache"

    def __post_init__(self) -> None:
        name = "DataConfig"
        for key in ("source", "tokenizer", "split", "text_column", "cache_dir"):
            if not isinstance(getattr(self, key), str):
                raise config_error(name, key, getattr(self, key), "must be a string")
        for key in ("source", "split", "text_column", "cache_dir"):
            if not getattr(self, key):
                raise config_error(name, key, getattr(self, key), "must not be empty")
        if not is_int(self.vocab_size) or not 257 <= self.vocab_size <= 65536:
            raise config_error(name, "vocab_size", self.vocab_size, "must be an integer in [257, 65536]")
        if not is_number(self.val_fraction) or not 0.0 <= self.val_fraction < 1.0:
            raise config_error(name, "val_fraction", self.val_fraction, "must be a number in [0, 1)")
        for key in ("seed", "max_docs", "max_chars", "tokenizer_train_docs"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                raise config_error(name, key, getattr(self, key), "must be a non-negative integer")
        if not isinstance(self.streaming, bool):
            raise config_error(name, "streaming", self.streaming, "must be true or false")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of a training run.

    Length: ``steps`` optimizer steps, or (with ``steps = 0``) ``epochs`` passes over the
    training blocks. Each step consumes ``batch_size`` sequences of ``n_ctx`` tokens in
    total, over all processes and ``grad_accum`` micro-batches, so the result does not
    depend on how a batch is split (``batch_size`` must divide by
    ``world_size * grad_accum``).

    Learning rate: linear warmup from 0 over ``warmup_steps``, then ``schedule``:
    ``"cosine"`` or ``"linear"`` decay to ``min_lr`` at the last step, or ``"constant"``.
    AdamW(``beta1``, ``beta2``, ``eps``) decays (``weight_decay``) every parameter of
    dimension >= 2 (all matmul weights and the embedding/unembedding, as in nanoGPT) and no
    1-D parameter (norm scales, biases). ``grad_clip``: max global gradient norm (0: off).

    Cadence (in steps, 0 disables): ``log_every`` (metrics line and progress bar),
    ``eval_every`` (validation loss over at most ``eval_batches`` batches of
    ``eval_batch_size`` sequences, 0: the whole split), ``checkpoint_every`` (keeping the
    newest ``keep_last``; the final checkpoint is always written).

    ``num_threads``: small models train several times faster on one CPU thread than on
    several threads that contend with other processes; 0 leaves torch's default.
    """

    steps: int = 1000
    epochs: float = 0.0
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 0
    eval_batch_size: int = 0  # sequences per eval batch per process; 0: the training micro-batch
    checkpoint_every: int = 0
    keep_last: int = 3
    device: str = "auto"
    num_threads: int = 0  # torch intra-op CPU threads per process (0: torch's default)
    autocast: str = "none"  # "bfloat16": mixed-precision forward pass (weights and optimizer stay in model.dtype)

    def __post_init__(self) -> None:
        name = "TrainConfig"
        for key in ("steps", "warmup_steps", "seed", "log_every", "eval_every", "eval_batches",
                    "eval_batch_size", "checkpoint_every", "num_threads"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                raise config_error(name, key, getattr(self, key), "must be a non-negative integer")
        for key in ("batch_size", "grad_accum", "keep_last"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise config_error(name, key, getattr(self, key), "must be a positive integer")
        if not is_number(self.epochs) or self.epochs < 0:
            raise config_error(name, "epochs", self.epochs, "must be a non-negative number")
        if (self.steps > 0) == (self.epochs > 0):
            raise config_error(
                name, "steps", self.steps,
                f"set exactly one of train.steps and train.epochs (got epochs={self.epochs}); "
                "use steps = 0 to train by epochs",
            )
        if not is_number(self.lr) or not self.lr > 0:
            raise config_error(name, "lr", self.lr, "must be a positive number")
        if not is_number(self.min_lr) or not 0 <= self.min_lr <= self.lr:
            raise config_error(name, "min_lr", self.min_lr, f"must be a number in [0, lr={self.lr}]")
        if self.schedule not in SCHEDULES:
            raise config_error(name, "schedule", self.schedule, f"allowed values are {list(SCHEDULES)}")
        for key in ("beta1", "beta2"):
            if not is_number(getattr(self, key)) or not 0 <= getattr(self, key) < 1:
                raise config_error(name, key, getattr(self, key), "must be a number in [0, 1)")
        if not is_number(self.eps) or not self.eps > 0:
            raise config_error(name, "eps", self.eps, "must be a positive number")
        for key in ("weight_decay", "grad_clip"):
            if not is_number(getattr(self, key)) or getattr(self, key) < 0:
                raise config_error(name, key, getattr(self, key), "must be a non-negative number")
        if self.device not in DEVICES and not (isinstance(self.device, str) and self.device.startswith("cuda:")):
            raise config_error(name, "device", self.device, f"allowed values are {list(DEVICES)} or 'cuda:N'")
        if self.autocast not in AUTOCAST_DTYPES:
            raise config_error(name, "autocast", self.autocast, f"allowed values are {list(AUTOCAST_DTYPES)}")


_SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _allowed_keys(section: str) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(_SECTIONS[section]) if f.init)


@dataclass
class RunConfig:
    """A whole training recipe: ``model``, ``data`` and ``train`` sections.

    ``vocab_from_tokenizer`` is true when the recipe leaves ``model.d_vocab`` out: the
    trainer then sets it to the tokenizer's vocabulary size (see :meth:`with_vocab_size`).
    ``source`` names where the recipe came from (for messages only).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vocab_from_tokenizer: bool = False
    source: str = "<defaults>"

    def with_vocab_size(self, vocab_size: int) -> "RunConfig":
        """Resolve ``model.d_vocab`` against a tokenizer of ``vocab_size`` tokens: set it if
        the recipe left it out, else check it is large enough."""
        if self.vocab_from_tokenizer:
            return dataclasses.replace(self, model=self.model.replace(d_vocab=vocab_size), vocab_from_tokenizer=False)
        if self.model.d_vocab < vocab_size:
            raise ValueError(
                f"model.d_vocab={self.model.d_vocab} in {self.source} is smaller than the tokenizer's "
                f"vocabulary ({vocab_size} tokens); raise it or leave model.d_vocab out to use the tokenizer's size"
            )
        return self

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{"model": {...}, "data": {...}, "train": {...}}`` (what :meth:`from_dict` reads)."""
        model = self.model.to_dict()
        if self.vocab_from_tokenizer:
            model.pop("d_vocab")
        return {"model": model, "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "run config") -> "RunConfig":
        """Validate a ``{"model": ..., "data": ..., "train": ...}`` mapping (each optional)."""
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown section(s) {unknown} in {where}; allowed sections: {sorted(_SECTIONS)}")
        tables: dict[str, dict[str, Any]] = {}
        for section in _SECTIONS:
            table = data.get(section, {})
            if not isinstance(table, Mapping):
                raise ValueError(f"[{section}] in {where} must be a table, got {type(table).__name__}")
            unknown = sorted(set(table) - set(_allowed_keys(section)))
            if unknown:
                raise ValueError(
                    f"unknown key(s) {unknown} in section [{section}] of {where}; "
                    f"allowed keys: {_allowed_keys(section)}"
                )
            tables[section] = dict(table)
        # Training by epochs: a recipe that names only `epochs` means "not by steps".
        if "epochs" in tables["train"] and "steps" not in tables["train"]:
            tables["train"]["steps"] = 0
        vocab_from_tokenizer = "d_vocab" not in tables["model"]
        if vocab_from_tokenizer:  # placeholder until the tokenizer is known
            tables["model"]["d_vocab"] = tables["data"].get("vocab_size", DataConfig.vocab_size)
        try:
            model = ModelConfig.from_dict(tables["model"], where=f"section [model] of {where}")
            data_cfg = DataConfig(**tables["data"])
            train = TrainConfig(**tables["train"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err
        return cls(model=model, data=data_cfg, train=train, vocab_from_tokenizer=vocab_from_tokenizer, source=where)

    def to_toml(self) -> str:
        """The recipe as TOML (``load_run_config`` reads it back to an equal config)."""
        lines = [f"# resolved run config (from {self.source})"]
        for section, table in self.to_dict().items():
            lines.append(f"\n[{section}]")
            for key, value in table.items():
                if value is not None:  # TOML has no null; None fields are None by default
                    lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def save_toml(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as a TOML value")


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value`` into ``(section, key, value)``.

    ``value`` is read as a TOML literal (``3e-4``, ``true``, ``"relu"``, ``128``); anything
    that is not a TOML literal is taken as a bare string, so ``model.mlp_kind=relu`` works.
    """
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value, e.g. train.lr=3e-4")
    name, raw = text.split("=", 1)
    name, raw = name.strip(), raw.strip()
    section, dot, key = name.partition(".")
    if not dot or not key or "." in key:
        raise ValueError(
            f"override {text!r}: the name must be section.key with section one of {sorted(_SECTIONS)}"
        )
    if section not in _SECTIONS:
        raise ValueError(f"override {text!r}: unknown section {section!r}; allowed sections: {sorted(_SECTIONS)}")
    if key not in _allowed_keys(section):
        raise ValueError(
            f"override {text!r}: unknown key {key!r} in section [{section}]; allowed keys: {_allowed_keys(section)}"
        )
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare word: a string
    return section, key, value


def load_run_config(path: str | Path | None = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Read a TOML recipe (``None``: all defaults), apply ``section.key=value`` overrides
    (see :func:`parse_override`), validate. Errors are ``ValueError`` naming the key, the
    section, the file and the allowed keys or values; a missing file is ``FileNotFoundError``.
    """
    where = "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"run config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot parse run config {path}: {err}") from err
    if overrides:
        data = {section: dict(table) if isinstance(table, Mapping) else table for section, table in data.items()}
        for text in overrides:
            try:
                section, key, value = parse_override(text)
            except ValueError as err:
                raise ValueError(f"{err} (applied to {where})") from None
            table = data.setdefault(section, {})
            if not isinstance(table, dict):
                raise ValueError(f"[{section}] in {where} must be a table, got {type(table).__name__}")
            table[key] = value
        where = f"{where} with overrides {list(overrides)}"
    return RunConfig.from_dict(data, where=where)
