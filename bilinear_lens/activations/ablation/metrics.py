"""Metrics of a forward pass's logits (TransformerLens-style ``logits -> scalar`` callables)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch

from jaxtyping import Float, Int
from torch import Tensor

from bilinear_lens.models.model import next_token_loss
from bilinear_lens.models.protocol import HookedModel
from bilinear_lens.weights.directions import TokenLike, token_id

MetricFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor]
# A built-in metric per value it averages ([batch, k]); their mean is the scalar metric.
TokenMetricFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, "batch k"]]


def _at_position(logits: Float[Tensor, "batch pos d_vocab"], position: Optional[int]) -> Tensor:
    return logits if position is None else logits[:, position]


def loss_metric(tokens: Int[Tensor, "batch pos"]) -> MetricFn:
    """Mean next-token cross-entropy of ``tokens``
    (:func:`~bilinear_lens.models.model.next_token_loss`: float64 for float64 logits, so
    exactness checks are not limited by float32)."""

    def loss(logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        return next_token_loss(logits, tokens.to(logits.device))

    return loss


def logit_metric(token: int, position: Optional[int] = -1) -> MetricFn:
    """Mean logit of ``token`` at ``position`` (``-1``: the last; ``None``: every position)."""

    def logit(logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        return _at_position(logits, position)[..., token].mean()

    return logit


def logit_diff_metric(token_a: int, token_b: int, position: Optional[int] = -1) -> MetricFn:
    """Mean ``logit[token_a] - logit[token_b]`` at ``position`` (as :func:`logit_metric`)."""

    def logit_diff(logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        at = _at_position(logits, position)
        return (at[..., token_a] - at[..., token_b]).mean()

    return logit_diff


def check_position(position: Optional[int], n_pos: int) -> None:
    """``ValueError`` naming ``position`` unless it is ``None`` or an int index into ``n_pos``
    positions (``[-n_pos, n_pos)``)."""
    if position is None:
        return
    if isinstance(position, bool) or not isinstance(position, int):
        raise ValueError(f"position must be an int index or None (every position), got {position!r}")
    if not -n_pos <= position < n_pos:
        raise ValueError(
            f"position={position} is out of range for tokens with {n_pos} positions: "
            f"give an index in [{-n_pos}, {n_pos}), or None for every position"
        )


def named_metrics(
    model: HookedModel,
    tokens: Tensor,
    metric: Union[None, MetricFn, Mapping[str, MetricFn]],
    logit: Optional[TokenLike],
    logit_diff: Optional[tuple[TokenLike, TokenLike]],
    position: Optional[int],
) -> dict[str, MetricFn]:
    """``loss`` and the metrics asked for, by name (see
    :func:`~bilinear_lens.activations.ablation.sweep.ablation_sweep`)."""
    check_position(position, tokens.shape[-1])
    metrics: dict[str, MetricFn] = {"loss": loss_metric(tokens)}
    if logit is not None:
        metrics["logit"] = logit_metric(token_id(model, logit), position)
    if logit_diff is not None:
        if len(logit_diff) != 2:
            raise ValueError(f"logit_diff must be a pair of tokens (a, b), got {logit_diff!r}")
        token_a, token_b = (token_id(model, token) for token in logit_diff)
        metrics["logit_diff"] = logit_diff_metric(token_a, token_b, position)
    if metric is not None:
        extra = dict(metric) if isinstance(metric, Mapping) else {"metric": metric}
        clash = set(extra) & set(metrics)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} clash with the built-in metrics")
        metrics.update(extra)
    return metrics


@dataclass(frozen=True)
class TokenMetric:
    """A built-in metric per value it averages: ``values(logits)`` is ``[batch, k]`` (its mean
    is the scalar metric) and ``positions`` the token positions whose documents label those
    ``k`` columns (:mod:`~bilinear_lens.activations.ablation.uncertainty` clusters by them)."""

    values: TokenMetricFn
    positions: slice


def token_metrics(
    model: HookedModel,
    tokens: Tensor,
    logit: Optional[TokenLike],
    logit_diff: Optional[tuple[TokenLike, TokenLike]],
    position: Optional[int],
) -> dict[str, TokenMetric]:
    """Per-value versions of the built-in metrics of :func:`named_metrics` (custom metrics
    have none): the loss of each predicted token (labelled by the token predicted,
    ``tokens[:, 1:]``), the logit / logit difference at each position read. The mean of the
    values is the scalar metric (every row has the same length)."""
    n_pos = tokens.shape[-1]
    at_slice = slice(None) if position is None else slice(position % n_pos, position % n_pos + 1)

    def at(logits: Tensor) -> Tensor:  # [batch, k, d_vocab] at the position(s) read
        return logits[:, at_slice]

    out: dict[str, TokenMetric] = {"loss": TokenMetric(
        lambda logits: next_token_loss(logits, tokens.to(logits.device), per_token=True), slice(1, None))}
    if logit is not None:
        t = token_id(model, logit)
        out["logit"] = TokenMetric(lambda logits: at(logits)[..., t].double(), at_slice)
    if logit_diff is not None:
        a, b = (token_id(model, token) for token in logit_diff)
        out["logit_diff"] = TokenMetric(lambda logits: (at(logits)[..., a] - at(logits)[..., b]).double(), at_slice)
    return out


def evaluate(metrics: Mapping[str, MetricFn], logits: Tensor) -> dict[str, float]:
    return {name: float(fn(logits)) for name, fn in metrics.items()}
