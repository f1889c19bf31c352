"""Replacement values: what ablated (or patched) units are set to.

- ``"zero"``: 0;
- ``"mean"``: their mean over every batch row and position of a ``reference`` batch;
- ``"resample"``: their values at a random position of the ``reference`` batch. One source
  position ``(b', p')`` is drawn per ablated position and shared by all ablated units, so
  their joint distribution is kept (as in causal scrubbing). The draw depends only on
  ``seed`` and the activation's shape: every forward pass (and every copy of a sweep)
  sees the same resample;
- ``"patch"`` (sweeps only): the clean run's activation at the same batch row and position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from jaxtyping import Int
from torch import Tensor

from bilinear_lens.activations.capture import capture_activations
from bilinear_lens.models.protocol import HookedModel

METHODS = ("zero", "mean", "resample")


def check_method(method: str, reference: Optional[Tensor]) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "zero" and reference is None:
        raise ValueError(f"method={method!r} needs reference tokens (reference=...) to take values from")


def check_tokens(tokens: Tensor, name: str = "tokens", d_vocab: Optional[int] = None, min_pos: int = 1) -> None:
    """One-line ``ValueError`` naming ``name`` unless ``tokens`` is a non-empty integer
    ``[batch, pos]`` tensor with at least ``min_pos`` positions (and, given ``d_vocab``, ids
    in ``[0, d_vocab)``)."""
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be a [batch, pos] tensor of token ids, got {shape}")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of token ids, got {tokens.dtype}")
    if tokens.numel() == 0:
        raise ValueError(f"{name} must hold at least one token, got shape {tuple(tokens.shape)}")
    if tokens.shape[1] < min_pos:
        raise ValueError(
            f"{name} has {tokens.shape[1]} position(s) per row, need at least {min_pos} "
            f"(the loss predicts each next token), got shape {tuple(tokens.shape)}"
        )
    if d_vocab is not None:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= d_vocab:
            raise ValueError(f"{name} holds token ids in [{low}, {high}], outside the model's vocabulary [0, {d_vocab})")


@dataclass(frozen=True)
class Replacement:
    """What the ablated units of an activation ``[*batch, d]`` are set to.

    ``values(shape)`` is broadcastable to ``shape``: a scalar zero, the reference mean
    ``[d]``, a resample ``[*shape[:-1], d]``, or the clean activation (patching).
    """

    method: str  # "zero" | "mean" | "resample" | "patch"
    source: Optional[Tensor] = None  # mean [d] | reference rows [n_ref, d] | clean [*batch, d]
    seed: int = 0

    def values(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.method == "zero":
            return torch.zeros((), dtype=dtype, device=device)
        assert self.source is not None
        source = self.source.to(dtype=dtype, device=device)
        if self.method == "mean":
            return source
        if self.method == "patch":
            if source.shape != shape:
                raise ValueError(f"clean activation {tuple(source.shape)} does not match the run's {tuple(shape)}")
            return source
        # resample: a fresh generator per call, so the draw is a function of (seed, shape).
        gen = torch.Generator().manual_seed(self.seed)
        rows = torch.randint(source.shape[0], tuple(shape[:-1]), generator=gen)
        return source[rows.to(device)]


def replacement(
    model: HookedModel,
    hook_name: str,
    method: str,
    reference: Optional[Int[Tensor, "ref_batch ref_pos"]],
    seed: int,
    read: Callable[[Tensor], Tensor] = lambda act: act,
) -> Replacement:
    """Replacement values for ``method``; ``read`` maps a reference activation to the ablated
    quantity (the identity for neurons, the component ``[..., 1]`` along a direction)."""
    check_method(method, reference)
    if method == "zero":
        return Replacement("zero")
    assert reference is not None
    check_tokens(reference, "reference", d_vocab=model.cfg.d_vocab)
    ref = read(capture_activations(model, reference, [hook_name])[hook_name])
    ref = ref.reshape(-1, ref.shape[-1])  # [n_ref, d]: every batch row and position
    if method == "mean":
        return Replacement("mean", ref.mean(0))
    return Replacement("resample", ref, seed)
