"""The one resume rule of both trainers (the model's :func:`~bilinear_lens.training.loop.train`
and the SAE's :func:`~bilinear_lens.sae.train.train_sae`).

A resumed run trains on from its checkpoint with the recipe it was started with, except:

- any ``[train]`` value may change (more steps, another lr, ...), but the schedule may not
  end before the checkpoint's step (:func:`check_steps_reach`): a run at step 275 resumed
  with ``train.steps = 200`` is refused, not published as finished;
- ``data.cache_dir`` may change (where the token cache lives does not change its tokens);
- nothing else: the architecture (``[model]`` / ``[sae]``) and the corpus (the rest of
  ``[data]``, which decides the batches) stay (:func:`resume_may_change`).

A run resumed at its last step with its ``final/`` written has nothing to train
(:func:`finished_final`): both trainers then return the finished result and write nothing.

Differences are named by one formatter (:func:`format_differences`):
``"section.key: saved (saved) != given (given); ..."``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from bilinear_lens.training.run_dir import FINAL_DIR
from bilinear_lens.training.state import read_train_state

# [data] keys a resumed run may change: where the token cache lives does not change its tokens
RESUME_SAFE_DATA_KEYS = ("cache_dir",)

Difference = tuple[str, Any, Any]  # (name, saved value, given value)


def resume_may_change(name: str) -> bool:
    """Whether a resumed run may take a recipe value ``"section.key"`` other than the saved
    one: any ``[train]`` value and ``data.cache_dir``; not the architecture (``[model]``,
    ``[sae]``) nor the corpus (the rest of ``[data]``)."""
    section, _, key = name.partition(".")
    return section == "train" or (section == "data" and key in RESUME_SAFE_DATA_KEYS)


def field_differences(saved: Any, given: Any, prefix: str = "") -> list[Difference]:
    """``(prefix + field, saved value, given value)`` for each field where two instances of
    one dataclass differ, in field order."""
    return [(prefix + f.name, getattr(saved, f.name), getattr(given, f.name)) for f in dataclasses.fields(saved)
            if getattr(saved, f.name) != getattr(given, f.name)]


def section_differences(saved: Any, given: Any, sections: Iterable[str]) -> list[Difference]:
    """``("section.key", saved value, given value)`` for each value that differs between two
    recipes whose ``sections`` are dataclass attributes (``recipe.train``, ``recipe.data``, ...)."""
    return [d for section in sections
            for d in field_differences(getattr(saved, section), getattr(given, section), prefix=f"{section}.")]


def refused_differences(saved: Any, given: Any, sections: Iterable[str]) -> list[Difference]:
    """The :func:`section_differences` that :func:`resume_may_change` does not allow."""
    return [d for d in section_differences(saved, given, sections) if not resume_may_change(d[0])]


def format_differences(differences: list[Difference]) -> str:
    """``"name: a (saved) != b (given); ..."`` on one line."""
    return "; ".join(f"{name}: {a!r} (saved) != {b!r} (given)" for name, a, b in differences)


def check_steps_reach(
    total_steps: int, checkpoint_step: int, source: str, checkpoint: Union[str, Path], setting: Optional[str] = None,
) -> None:
    """Refuse a schedule of ``total_steps`` that ends before ``checkpoint_step``: a resumed
    run trains on from its checkpoint, it cannot end before it. ``setting`` names the recipe
    value that set the schedule (default ``train.steps=<total_steps>``)."""
    if total_steps < checkpoint_step:
        setting = setting or f"train.steps={total_steps}"
        raise ValueError(f"{setting} in {source} is below step {checkpoint_step} of {checkpoint}: a "
                         "resumed run trains on from its checkpoint (raise train.steps, or resume from an earlier "
                         "checkpoint)")


def finished_final(out_dir: Path, checkpoint: Path, total_steps: int) -> Optional[Path]:
    """``out_dir/final`` when resuming from ``checkpoint`` has nothing to train: the checkpoint
    is at step ``total_steps`` and ``final/`` holds that same step; else ``None`` (train on,
    e.g. a schedule extended past a finished run, or a run killed before writing ``final/``)."""
    final = Path(out_dir) / FINAL_DIR
    if read_train_state(checkpoint).step != total_steps or not final.is_dir():
        return None
    return final if read_train_state(final).step == total_steps else None
