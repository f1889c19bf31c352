"""Training recipes: ``DataConfig``, ``TrainConfig`` and the ``RunConfig`` that joins them
to a :class:`~bilinear_lens.models.config.ModelConfig`, validated on construction.

A bad value raises ``ValueError`` naming the section, the field, the value and what is
allowed, so a typo in a recipe fails before any data is read. Every float field must be
finite (``inf`` and ``nan`` are refused like any other bad value).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from bilinear_lens.distributed import DEVICE_NAMES, is_device_name
from bilinear_lens.models.config import NO_NORM_NAME, ModelConfig, config_error, is_int, is_number
from bilinear_lens.data.documents import DOCUMENT_RULES

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
AUTOCAST_DTYPES = ("none", "bfloat16")  # float16 would need a GradScaler


def check_finite_floats(obj: Any) -> None:
    """Refuse a non-finite value (``inf``, ``-inf``, ``nan``) in any float field of the
    config dataclass ``obj``, naming the class and the field (before the range checks, which
    ``inf`` can pass)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.type in ("float", float) and is_number(value) and not math.isfinite(value):
            raise config_error(type(obj).__name__, f.name, value, "must be a finite number")


@dataclass
class DataConfig:
    """Where the training tokens come from (see :func:`bilinear_lens.data.corpus.prepare_data`).

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
    # Where a document ends in a local .txt file (bilinear_lens.data.documents): "auto"
    # (<|endoftext|> lines if present, else the whole file, its tail held out), "endoftext",
    # "paragraph", "line" or "file". Ignored for other sources.
    documents: str = "auto"

    def __post_init__(self) -> None:
        name = "DataConfig"
        check_finite_floats(self)
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
        if self.documents not in DOCUMENT_RULES:
            raise config_error(name, "documents", self.documents, f"must be one of {', '.join(DOCUMENT_RULES)}")


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

    Divergence guard: training stops with an error when the loss or gradient norm is not
    finite, and a checkpoint is written only when every weight and optimizer-state value
    is finite and no weight exceeds ``max_abs_weight`` in absolute value (0: no bound).
    Healthy weights of these models are O(1); a diverged run's grow past 1e6 in a few steps.

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
    max_abs_weight: float = 1e4
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
        check_finite_floats(self)
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
        for key in ("weight_decay", "grad_clip", "max_abs_weight"):
            if not is_number(getattr(self, key)) or getattr(self, key) < 0:
                raise config_error(name, key, getattr(self, key), "must be a non-negative number")
        if not is_device_name(self.device):  # the one device grammar; CUDA's presence is checked at run time
            raise config_error(name, "device", self.device, f"allowed values are {list(DEVICE_NAMES)} or 'cuda:N'")
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
                if section == "model" and key == "normalization_type" and value is None:
                    value = NO_NORM_NAME  # "no norm" is not the default: TOML says it "none"
                if value is not None:  # TOML has no null; None fields are None by default
                    lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def save_toml(self, path: str | Path) -> None:
        """Write :meth:`to_toml` to ``path`` atomically (temporary sibling + rename)."""
        from bilinear_lens.files.atomic import atomic_write_text

        atomic_write_text(path, self.to_toml())


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
    return section, key, toml_value(raw)


def toml_value(raw: str) -> Any:
    """An override's value as TOML reads it (``3``, ``1e-4``, ``true``, ``"x"``); a bare word
    that is not TOML is the string itself."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """The tables of the TOML file ``path``; a missing file is ``FileNotFoundError`` and a
    malformed one ``ValueError``, both naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot parse {what} {path}: {err}") from err


def load_run_config(path: str | Path | None = None, overrides: Optional[list[str] | str] = None) -> RunConfig:
    """Read a TOML recipe (``None``: all defaults), apply ``section.key=value`` overrides
    (see :func:`parse_override`; a single string is one override; anything but a list of
    strings is a ``TypeError``), validate. Errors are ``ValueError`` naming the key, the
    section, the file and the allowed keys or values; a missing file is ``FileNotFoundError``.
    """
    if isinstance(overrides, str):  # one override given as a bare string
        overrides = [overrides]
    if overrides is not None and (not isinstance(overrides, (list, tuple))
                                  or not all(isinstance(text, str) for text in overrides)):
        raise TypeError(f"overrides must be a list of strings like 'train.lr=3e-4', got {overrides!r}")
    where = "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        where = str(path)
        data = read_toml(path, "run config")
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
