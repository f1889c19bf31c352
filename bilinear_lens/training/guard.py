"""Divergence guard: stop a diverging run before it writes a checkpoint it cannot resume.

Checked every step: the (all-reduced) loss and the gradient norm must be finite, else the
update is not applied. Checked before every checkpoint: every weight and every optimizer
state tensor (AdamW's moments) must be finite, and ``max |w| <= max_abs_weight``. A run
with a huge learning rate keeps a finite loss for a few steps while its weights grow to
~1e20 (normalization hides the scale), so the loss alone would let such a checkpoint be
written and later named as the place to resume from. Only checkpoints that passed the
check are recorded as good, so the checkpoint an error names is always one that resumes.

Any model and optimizer work: the guard reads ``parameters()`` and ``optimizer.state``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

__all__ = ["NonFiniteLossError", "DivergenceGuard"]


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss or gradient norm became NaN/inf, or the weights or
    optimizer state became non-finite or exploded. The update or checkpoint of that step was
    not written: ``last_checkpoint`` (checked when written) is intact and resumes."""

    def __init__(self, step: int, what: str, value: float, last_checkpoint: Optional[Path]):
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint
        if last_checkpoint is not None:
            advice = (f"the last good checkpoint is {last_checkpoint} (resume from it with a lower "
                      "train.lr or a smaller train.grad_clip)")
        else:
            advice = "no good checkpoint was written yet (start again with a lower train.lr)"
        super().__init__(f"{what} ({value}) at step {step}; training stopped without saving that step, {advice}")


class DivergenceGuard:
    """Raises :class:`NonFiniteLossError` naming the newest checkpoint that passed
    :meth:`check_state` (or the one the run resumed from).

    ``max_abs_weight``: bound on ``|w|`` for every weight (0: none).
    """

    def __init__(self, max_abs_weight: float, last_good: Optional[Path] = None):
        self.max_abs_weight = max_abs_weight
        self.last_good = last_good

    def fail(self, step: int, what: str, value: float) -> None:
        raise NonFiniteLossError(step, what, value, self.last_good)

    def check_scalar(self, step: int, what: str, value: float) -> None:
        """``value`` (a loss, a gradient norm) must be finite."""
        if not math.isfinite(value):
            self.fail(step, f"non-finite {what}", value)

    @torch.no_grad()
    def check_state(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Every weight and optimizer tensor finite, every ``|w| <= max_abs_weight``."""
        largest = 0.0
        for name, param in model.named_parameters():
            if param.numel() == 0:
                continue
            if not torch.isfinite(param).all():
                self.fail(step, f"non-finite weights in {name}", float(param.abs().max()))
            largest = max(largest, float(param.abs().max()))
        if self.max_abs_weight and largest > self.max_abs_weight:
            self.fail(step, f"exploding weights: max |w| > train.max_abs_weight={self.max_abs_weight:g}", largest)
        for index, values in enumerate(optimizer.state.values()):
            for key, value in values.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                    self.fail(step, f"non-finite optimizer state {key} of parameter {index}", float(value.abs().max()))

    def mark_good(self, path: Path) -> None:
        """``path`` now holds a checkpoint that passed :meth:`check_state`."""
        self.last_good = path
