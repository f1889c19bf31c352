"""Next-token choice for :meth:`BilinearTransformer.generate`: greedy, temperature, top-k, top-p.

``temperature == 0`` is greedy (argmax). Otherwise the logits are divided by the
temperature, restricted to the ``top_k`` largest and then to the smallest set whose
probability reaches ``top_p`` (nucleus; the most likely token always stays), and one
token is drawn from the softmax of what is left. Bad values raise ``ValueError``.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor


def check_sampling_args(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """One-line ``ValueError`` naming the argument: ``temperature >= 0``, ``top_k >= 1``, ``0 < top_p <= 1``."""
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature={temperature} is invalid: must be >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: must be a positive integer or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: must lie in (0, 1] or be None")


def check_logits(logits: Tensor, name: str = "logits") -> None:
    """``ValueError`` naming ``name`` unless ``logits`` is a ``[..., d_vocab]`` float tensor
    whose rows hold no NaN or ``+inf`` and at least one finite value."""
    if not isinstance(logits, Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        what = f"a {logits.dtype} tensor of shape {tuple(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a float [batch, d_vocab] tensor, got {what}")
    if logits.shape[-1] == 0:
        raise ValueError(f"{name} has no vocabulary entries: shape {tuple(logits.shape)}")
    rows = logits.reshape(-1, logits.shape[-1])
    bad = rows.isnan().any(-1) | rows.isposinf().any(-1) | ~rows.isfinite().any(-1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} row {row} has NaN, +inf or no finite value ({int(bad.sum())} of {rows.shape[0]} rows bad): "
            "cannot sample a token (-inf is fine for excluded tokens)"
        )


def filter_logits(
    logits: Float[Tensor, "batch d_vocab"], top_k: Optional[int] = None, top_p: Optional[float] = None
) -> Float[Tensor, "batch d_vocab"]:
    """``logits`` with everything outside the top-k / top-p set set to ``-inf``."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: Float[Tensor, "batch d_vocab"],
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> Int[Tensor, "batch 1"]:
    """The next token of each row (greedy when ``temperature == 0``).

    ``logits`` must be a float tensor without NaN or ``+inf``, with a finite value in every
    row (``-inf`` marks an excluded token); otherwise a one-line ``ValueError`` names
    ``logits`` and the first bad row."""
    check_sampling_args(temperature, top_k, top_p)
    check_logits(logits)
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)
