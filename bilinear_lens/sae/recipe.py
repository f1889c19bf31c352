"""SAE training recipes: a TOML file with ``[sae]`` (:class:`SAETrainConfig`) and ``[data]``
(:class:`~bilinear_lens.training.config.DataConfig`, the corpus whose token cache feeds the
model; its tokenizer is always the checkpoint's). Errors name the key, section and file.

Defaults are the paper's (Pearce et al. 2024, code ``tdooms/bilinear-decomposition``,
``sae/sae.py``): top-k with ``k = 30``, ``expansion = 4`` (``d_sae = 4 d_model``), lr
``1e-4`` cosine-annealed to ``2e-5``, Adam without weight decay (AdamW with
``weight_decay = 0``), decoder rows kept at unit norm, encoder initialised as the decoder's
transpose, 4096 activations per step.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from bilinear_lens.models.config import config_error, is_int, is_number
from bilinear_lens.training.config import DataConfig, parse_override

DEFAULT_HOOK = "blocks.0.hook_resid_mid"


@dataclass
class SAETrainConfig:
    """How to train a top-k SAE on activation ``hook`` of a checkpoint.

    ``blocks_per_step`` token blocks (``n_ctx`` positions each) per step; their activations
    are computed on the fly and are the step's batch. A feature counts as dead once it has
    not fired for ``dead_after_steps`` steps. ``eval_blocks`` held-out blocks measure
    explained variance every ``eval_every`` steps and at the end.
    """

    hook: str = DEFAULT_HOOK
    expansion: int = 4
    k: int = 30
    steps: int = 1000
    blocks_per_step: int = 64
    lr: float = 1e-4
    min_lr: float = 2e-5
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    init_b_dec_to_mean: bool = True
    dead_after_steps: int = 100
    seed: int = 0
    log_every: int = 50
    eval_every: int = 250
    eval_blocks: int = 32
    checkpoint_every: int = 500
    keep_last: int = 2
    num_threads: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.hook, str) or not self.hook:
            raise config_error("SAETrainConfig", "hook", self.hook, "must be a hook name such as 'blocks.0.hook_resid_mid'")
        for keys, ok, allowed in _RULES:
            for key in keys:
                if not ok(getattr(self, key)):
                    raise config_error("SAETrainConfig", key, getattr(self, key), allowed)


# (fields, check, what is allowed) for SAETrainConfig
_RULES: tuple[tuple[tuple[str, ...], Callable[[Any], bool], str], ...] = (
    (("expansion", "k", "steps", "blocks_per_step", "dead_after_steps", "eval_blocks", "keep_last"),
     lambda v: is_int(v) and v >= 1, "must be a positive integer"),
    (("seed", "log_every", "eval_every", "checkpoint_every", "num_threads"),
     lambda v: is_int(v) and v >= 0, "must be a non-negative integer"),
    (("lr",), lambda v: is_number(v) and v > 0, "must be a positive number"),
    (("min_lr", "weight_decay"), lambda v: is_number(v) and v >= 0, "must be a non-negative number"),
    (("beta1", "beta2"), lambda v: is_number(v) and 0 <= v < 1, "must be a number in [0, 1)"),
    (("init_b_dec_to_mean",), lambda v: isinstance(v, bool), "must be true or false"),
)


_SECTIONS: dict[str, type] = {"sae": SAETrainConfig, "data": DataConfig}


@dataclass
class SAERecipe:
    sae: SAETrainConfig = field(default_factory=SAETrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    source: str = "<defaults>"

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"sae": dataclasses.asdict(self.sae), "data": dataclasses.asdict(self.data)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "SAE recipe") -> "SAERecipe":
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown section(s) {unknown} in {where}; allowed sections: {sorted(_SECTIONS)}")
        tables = {}
        for section, cls_ in _SECTIONS.items():
            table = data.get(section, {})
            allowed = sorted(f.name for f in dataclasses.fields(cls_))
            if not isinstance(table, Mapping):
                raise ValueError(f"[{section}] in {where} must be a table, got {type(table).__name__}")
            bad = sorted(set(table) - set(allowed))
            if bad:
                raise ValueError(f"unknown key(s) {bad} in section [{section}] of {where}; allowed keys: {allowed}")
            try:
                tables[section] = cls_(**table)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        return cls(sae=tables["sae"], data=tables["data"], source=where)


def _parse_override(text: str) -> tuple[str, str, Any]:
    """``sae.key=value`` (a TOML literal, else a bare string) or any ``data.key=value``
    that :func:`~bilinear_lens.training.config.parse_override` accepts."""
    name, eq, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if section != "sae":
        return parse_override(text)
    if not eq or not dot or key not in {f.name for f in dataclasses.fields(SAETrainConfig)}:
        allowed = sorted(f.name for f in dataclasses.fields(SAETrainConfig))
        raise ValueError(f"override {text!r} must be sae.key=value with key one of {allowed}")
    try:
        return section, key, tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return section, key, raw.strip()  # bare word: a string


def load_sae_recipe(path: Optional[str | Path], overrides: Optional[list[str]] = None) -> SAERecipe:
    """Read a TOML recipe (``None``: defaults) with ``sae.key=value`` / ``data.key=value``
    overrides (TOML literals, as ``bilinear-lens train --set``)."""
    data: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        path, where = Path(path), str(path)
        if not path.is_file():
            raise FileNotFoundError(f"SAE recipe not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"cannot parse SAE recipe {path}: {err}") from None
    for text in overrides or []:
        section, key, value = _parse_override(text)
        data.setdefault(section, {})[key] = value
    return SAERecipe.from_dict(data, where=where + (f" with overrides {list(overrides)}" if overrides else ""))
