"""SAE training recipes: a TOML file with three tables.

    [sae]    SAESpec       hook, expansion, k, b_dec init, dead-feature window
    [train]  TrainConfig   the model trainer's own optimizer / schedule / cadence section
                           (:class:`~bilinear_lens.training.config.TrainConfig`); ``batch_size``
                           counts token blocks (``n_ctx`` activations each) per step and
                           ``eval_batches`` held-out batches of that size are evaluated
    [data]   DataConfig    the text whose token cache feeds the model (its tokenizer is
                           always the checkpoint's); without ``source`` (or with
                           ``source = ""``): the model's own training data (below)

Errors name the key, section and file. Unset ``[train]`` keys take the paper's SAE settings
(:data:`SAE_TRAIN_DEFAULTS`; Pearce et al. 2024, code ``tdooms/bilinear-decomposition``,
``sae/sae.py``): top-k with ``k = 30``, ``expansion = 4`` (``d_sae = 4 d_model``), lr
``1e-4`` cosine-annealed to ``2e-5`` with no warmup, Adam without weight decay (AdamW with
``weight_decay = 0``) and no gradient clipping, decoder rows kept at unit norm, encoder
initialised as the decoder's transpose, 4096 activations per step (64 blocks of 64).

Which text (:func:`resolve_sae_data`, once per run, before anything is read): a recipe whose
``[data]`` names no ``source`` trains on the model's recorded training data, the ``[data]``
of the checkpoint's ``run_config.toml`` (source, documents rule, split, text column,
``max_docs``/``max_chars``, the train/val split's ``val_fraction`` and ``seed``, so the SAE's
held-out blocks are the model's validation documents; ``cache_dir`` too, so the model's token
cache is reused), with the ``[data]`` keys the recipe does set on top. A recorded local file
is checked against the recorded fingerprint (a missing or changed file is a one-line
``ValueError`` naming ``--set data.source=PATH``). A checkpoint with no record falls back to
the synthetic stories and says so. A recipe with a ``source`` trains on it. The resolved
``[data]`` (a local file as its absolute path) and where it came from (``"data_origin"``:
:data:`MODEL_DATA`, :data:`RECIPE_DATA` or :data:`NO_RECORD`) are saved with the recipe, so a
resumed run reads the same text.

A run directory keeps the recipe it trains with in ``sae_recipe.json`` (:data:`RECIPE_FILE`;
the three tables plus ``"checkpoint"``, the model it reads). A resumed run reuses that
recipe (:func:`load_saved_recipe`); a recipe given on resume may differ from it only where
:func:`~bilinear_lens.training.resume_rule.resume_may_change` allows, the rule both trainers
share: the architecture (``[sae]``) and the activations it is fit to (``[data]``, except
where the token cache lives) stay, ``[train]`` values (more steps, another lr, ...) may change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from bilinear_lens.files.names import SAE_RECIPE_FILE as RECIPE_FILE
from bilinear_lens.files.serialized import CheckpointError, read_json
from bilinear_lens.models.config import config_error, is_int
from bilinear_lens.training.config import DataConfig, TrainConfig, parse_override, read_toml, toml_value
from bilinear_lens.training.resume_rule import section_differences

DEFAULT_HOOK = "blocks.0.hook_resid_mid"
SAE_TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000, "batch_size": 64, "lr": 1e-4, "min_lr": 2e-5, "warmup_steps": 0, "schedule": "cosine",
    "beta1": 0.9, "beta2": 0.999, "weight_decay": 0.0, "grad_clip": 0.0, "log_every": 50, "eval_every": 250,
    "eval_batches": 1, "checkpoint_every": 500, "keep_last": 2,
}
# TrainConfig keys with no meaning for the SAE trainer: a recipe must leave them at their defaults
UNSUPPORTED_TRAIN_KEYS = ("epochs", "grad_accum", "eval_batch_size", "autocast")


@dataclass
class SAESpec:
    """The SAE: ``hook`` to read, ``d_sae = expansion * d_in`` features, top-``k``;
    ``b_dec`` starts at the mean of the first batch if ``init_b_dec_to_mean``; a feature
    counts as dead once it has not fired for ``dead_after_steps`` steps."""

    hook: str = DEFAULT_HOOK
    expansion: int = 4
    k: int = 30
    init_b_dec_to_mean: bool = True
    dead_after_steps: int = 100

    def __post_init__(self) -> None:
        if not isinstance(self.hook, str) or not self.hook:
            raise config_error("SAESpec", "hook", self.hook, "must be a hook name such as 'blocks.0.hook_resid_mid'")
        for key in ("expansion", "k", "dead_after_steps"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise config_error("SAESpec", key, getattr(self, key), "must be a positive integer")
        if not isinstance(self.init_b_dec_to_mean, bool):
            raise config_error("SAESpec", "init_b_dec_to_mean", self.init_b_dec_to_mean, "must be true or false")


_SECTIONS: dict[str, type] = {"sae": SAESpec, "train": TrainConfig, "data": DataConfig}

# Where an SAE's text comes from (SAERecipe.data_origin; "" until resolve_sae_data ran)
MODEL_DATA = "model"  # the checkpoint's recorded training data
RECIPE_DATA = "recipe"  # the recipe's data.source
NO_RECORD = "fallback"  # no source in the recipe and no record in the checkpoint: the synthetic stories
DATA_ORIGINS = (MODEL_DATA, RECIPE_DATA, NO_RECORD)
SOURCE_REMEDY = "give the SAE's text with --set data.source=PATH"


def _allowed(section: str) -> list[str]:
    return sorted(f.name for f in dataclasses.fields(_SECTIONS[section]))


@dataclass
class SAERecipe:
    sae: SAESpec = field(default_factory=SAESpec)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**SAE_TRAIN_DEFAULTS))
    data: DataConfig = field(default_factory=DataConfig)
    source: str = "<defaults>"
    # the [data] keys the recipe sets: without "source" the text is the model's own
    # (resolve_sae_data fills in the rest; until then ``data`` holds DataConfig's defaults there)
    data_keys: tuple[str, ...] = ()
    data_origin: str = ""  # one of DATA_ORIGINS once resolved; "" before
    data_note: str = ""  # what the SAE text line adds (a fallback, a recipe text that is not the model's)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "SAE recipe", data_origin: str = "") -> "SAERecipe":
        """Validate ``{"sae": ..., "train": ..., "data": ...}`` (each optional); a ``[data]``
        ``source`` of ``""`` counts as none (the model's own data)."""
        if isinstance(data.get("data"), Mapping) and data["data"].get("source") == "":
            data = {**data, "data": {k: v for k, v in data["data"].items() if k != "source"}}
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown section(s) {unknown} in {where}; allowed sections: {sorted(_SECTIONS)}")
        built = {}
        for section, cls_ in _SECTIONS.items():
            table = data.get(section, {})
            if not isinstance(table, Mapping):
                raise ValueError(f"[{section}] in {where} must be a table, got {type(table).__name__}")
            allowed = [k for k in _allowed(section) if section != "train" or k not in UNSUPPORTED_TRAIN_KEYS]
            bad = sorted(set(table) - set(allowed))
            if bad:
                raise ValueError(f"unsupported key(s) {bad} in section [{section}] of {where}; allowed keys: {allowed}")
            values = {**SAE_TRAIN_DEFAULTS, **table} if section == "train" else dict(table)
            try:
                built[section] = cls_(**values)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        data_keys = tuple(sorted(data.get("data", {})))
        return cls(**built, source=where, data_keys=data_keys, data_origin=data_origin)


def _parse_override(text: str) -> tuple[str, str, Any]:
    """``sae.key=value`` (a TOML literal, else a bare string), or a ``train.``/``data.``
    override as :func:`~bilinear_lens.training.config.parse_override` reads it."""
    name, eq, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if section != "sae":
        return parse_override(text)
    if not eq or not dot or key not in _allowed("sae"):
        raise ValueError(f"override {text!r} must be sae.key=value with key one of {_allowed('sae')}")
    return section, key, toml_value(raw.strip())


def _build(data: dict[str, Any], overrides: Optional[list[str]], where: str, data_origin: str = "") -> SAERecipe:
    """``data`` (``{section: {key: value}}``) with ``section.key=value`` overrides, validated."""
    for text in overrides or []:
        section, key, value = _parse_override(text)
        data.setdefault(section, {})[key] = value
    return SAERecipe.from_dict(data, where=where + (f" with overrides {list(overrides)}" if overrides else ""),
                               data_origin=data_origin)


def load_sae_recipe(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> SAERecipe:
    """Read a TOML recipe (``None``: the paper's defaults) with ``section.key=value``
    overrides, as ``bilinear-lens train --set``."""
    data: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        data = read_toml(path, "SAE recipe")
    return _build(data, overrides, where)


def _read_recipe_file(run_dir: Path) -> dict[str, Any]:
    path = run_dir / RECIPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {RECIPE_FILE} (the recipe of an SAE run), so there is no saved "
                                "recipe to resume with; give the recipe (CLI: --config)")
    data = read_json(path, what="SAE recipe")
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_saved_recipe(run_dir: Union[str, Path], overrides: Optional[list[str]] = None) -> SAERecipe:
    """The recipe an SAE run directory saved (``run_dir/sae_recipe.json``), with
    ``section.key=value`` overrides. ``[train]`` keys the SAE trainer does not support are
    written there at their defaults and dropped on reading (any other value is refused).
    A missing file is ``FileNotFoundError``."""
    run_dir = Path(run_dir)
    saved = _read_recipe_file(run_dir)
    data = {k: v for k, v in saved.items() if k not in ("checkpoint", "data_origin")}
    # a run saved before data_origin existed named its source (the defaults' "synthetic" included)
    origin = saved.get("data_origin") if saved.get("data_origin") in DATA_ORIGINS else RECIPE_DATA
    train = data.get("train")
    if isinstance(train, Mapping):
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        data["train"] = {k: v for k, v in train.items() if not (k in UNSUPPORTED_TRAIN_KEYS and v == defaults[k])}
    return _build(data, overrides, str(run_dir / RECIPE_FILE), data_origin=origin)


def saved_model_checkpoint(run_dir: Union[str, Path]) -> Optional[str]:
    """The model checkpoint an SAE run's ``sae_recipe.json`` names (as it was given), or
    ``None`` where the file has no ``"checkpoint"`` string. A missing file is ``FileNotFoundError``."""
    value = _read_recipe_file(Path(run_dir)).get("checkpoint")
    return value if isinstance(value, str) else None


def recipe_differences(saved: SAERecipe, given: SAERecipe) -> list[tuple[str, Any, Any]]:
    """``("section.key", saved value, given value)`` for each recipe value that differs."""
    return section_differences(saved, given, _SECTIONS)


def resolve_sae_data(recipe: SAERecipe, checkpoint: Union[str, Path]) -> SAERecipe:
    """``recipe`` with the text it trains on settled (module docstring): ``data`` complete,
    a local source absolute, ``data_origin`` and ``data_note`` set. A resolved recipe (a
    saved one) keeps its ``[data]``; where that is the model's recorded local file, the file
    is checked against the recorded fingerprint again. Raises ``ValueError``
    (:class:`~bilinear_lens.training.measured_text.MeasuredTextError`) for a recorded file
    that is missing or changed, or a record that cannot be read."""
    from bilinear_lens.data.corpus import is_local_source, resolved_source
    from bilinear_lens.training.measured_text import RUN_CONFIG_NAME, _recorded_local_file, recorded_data

    recorded = recorded_data(str(checkpoint))
    all_keys = tuple(sorted(_allowed("data")))

    def settled(data: DataConfig, origin: str, note: str = "") -> SAERecipe:
        return dataclasses.replace(recipe, data=data, data_keys=all_keys, data_origin=origin, data_note=note)

    def model_file(record: DataConfig) -> str:  # the recorded local file, found and checked
        found, note = _recorded_local_file(record, str(checkpoint), SOURCE_REMEDY)
        return str(found.resolve()), note or ""

    if recipe.data_origin:  # resolved already (a saved recipe): the same [data]
        note = recipe.data_note
        if (recipe.data_origin == MODEL_DATA and recorded is not None and is_local_source(recorded.source)
                and is_local_source(recipe.data.source)):
            # checked at the recorded path, or where it moved to (a resume that gave the new path)
            note = model_file(dataclasses.replace(recorded, source=recipe.data.source))[1]
        return settled(recipe.data, recipe.data_origin, note)
    given = {k: getattr(recipe.data, k) for k in recipe.data_keys}
    base = None if recorded is None else {**dataclasses.asdict(recorded), "tokenizer": ""}  # checkpoint's tokenizer
    if "source" in given:
        data = dataclasses.replace(recipe.data, source=resolved_source(recipe.data.source))
        if base is not None and _holds_recorded_bytes(recorded.source, data.source, checkpoint):
            moved = f"the model's training file, moved from {recorded.source}"
            return settled(DataConfig(**{**base, **given, "source": data.source}), MODEL_DATA, moved)
        note = ""
        if recorded is not None and resolved_source(recorded.source) != data.source:
            note = f"not the model's training data, {recorded.source} (data.source in its {RUN_CONFIG_NAME})"
        return settled(data, RECIPE_DATA, note)
    if recorded is None:
        return settled(recipe.data, NO_RECORD, f"the checkpoint records no training data (no {RUN_CONFIG_NAME}), "
                                               f"so the SAE trains on the built-in synthetic stories; {SOURCE_REMEDY}")
    note = ""
    if is_local_source(recorded.source):
        base["source"], note = model_file(recorded)
    return settled(DataConfig(**{**base, **given}), MODEL_DATA, note)


def _holds_recorded_bytes(recorded_source: str, source: str, checkpoint: Union[str, Path]) -> bool:
    """Whether local file ``source``, another path than the recorded local ``recorded_source``,
    holds the bytes the checkpoint's ``data_fingerprint.json`` records (the model's training
    file, moved)."""
    from bilinear_lens.data.corpus import is_local_source, resolved_source
    from bilinear_lens.data.fingerprint import holds_recorded_bytes
    from bilinear_lens.training.measured_text import recorded_fingerprint

    if not (is_local_source(recorded_source) and is_local_source(source)) or resolved_source(recorded_source) == source:
        return False
    return holds_recorded_bytes(recorded_fingerprint(str(checkpoint)), source)
