"""Adversarial masks read from a bilinear classifier's weights (Pearce et al. 2024, §3).

To push image ``x`` of class ``y`` towards class ``t``, read the logit *difference*
``u = u_t - u_y`` (``u_c = W_U[:, c]``) through the first MLP: ``Q_pix(u) = Q_pix(u_t) -
Q_pix(u_y)`` (:func:`~bilinear_lens.weights.image_eigen.pixel_interaction_matrices`; ``Q`` is
linear in ``u``). Its top positive eigenpair ``(lambda, v)`` is the pixel pattern that raises
``t`` against ``y`` fastest. Since ``Q v = lambda v``, the mask ``delta = eps s v`` with
``s = sign(v . x)`` changes the difference's quadratic part by exactly

    (x + delta)^T Q (x + delta) - x^T Q x = lambda (2 eps |v . x| + eps^2) > 0

(plus ``eps s (W_E u) . v`` through a residual's linear path). :func:`eigen_masks` picks,
per image, the target whose current margin plus this predicted change is largest. The
masks come from the weights alone; the image enters only through the sign ``s`` and the
target choice (as the image enters any attack). For a one-layer model without residual or
biases the prediction is exact.

Baselines at the same L2 norm ``eps``: :func:`gradient_masks` (the L2 fast gradient method:
``eps g / |g|``, ``g`` the gradient of the cross-entropy at ``x``) and :func:`random_masks`.
:func:`compare_attacks` reports, per ``eps``, the fraction of correctly classified images
whose prediction each mask flips. Pixels are not clipped to ``[0, 1]`` (clipping would
change the masks' norms and break the equal-norm comparison).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.models.image_classifier import ImageClassifier
from bilinear_lens.weights.image_eigen import class_directions, pixel_interaction_matrices


class PairEigen(NamedTuple):
    """For every ordered class pair ``(y, t)``: the largest eigenvalue ``values[y, t]`` of
    ``Q_pix(u_t - u_y)`` and its unit eigenvector ``vectors[y, t]`` ``[d_input]`` (the
    diagonal ``y = t`` is zero)."""

    values: Float[Tensor, "n_classes n_classes"]
    vectors: Float[Tensor, "n_classes n_classes d_input"]


@torch.no_grad()
def pair_eigen(model: ImageClassifier) -> PairEigen:
    """:class:`PairEigen` of ``model``'s first MLP (pure quadratic part: no bias row)."""
    U = class_directions(model)
    n = U.shape[0]
    Q = pixel_interaction_matrices(model, U, include_bias=False)  # [n, d, d]
    diff = Q[None, :, :, :] - Q[:, None, :, :]  # diff[y, t] = Q(u_t) - Q(u_y)
    values, vectors = torch.linalg.eigh(diff.flatten(0, 1))  # ascending: the last is the largest
    top_values = values[:, -1].reshape(n, n)
    top_vectors = vectors[:, :, -1].reshape(n, n, -1)
    eye = torch.eye(n, dtype=torch.bool, device=U.device)
    return PairEigen(top_values.masked_fill(eye, 0.0), top_vectors.masked_fill(eye[..., None], 0.0))


def _check_attack_inputs(model: ImageClassifier, x: Tensor, y: Tensor, eps: float) -> Tensor:
    x = model.flatten(x).to(model.W_U.dtype)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds non-finite pixels")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be [{x.shape[0]}] (one label per image), got shape {tuple(y.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return x


@torch.no_grad()
def eigen_masks(
    model: ImageClassifier, x: Tensor, y: Tensor, eps: float, pairs: Optional[PairEigen] = None,
) -> tuple[Float[Tensor, "n d_input"], Tensor]:
    """The weight-derived masks (module docstring) of L2 norm ``eps`` for images ``x`` of
    classes ``y``, and the target class chosen for each ``[n]``."""
    x = _check_attack_inputs(model, x, y, eps)
    pairs = pair_eigen(model) if pairs is None else pairs
    y = y.to(x.device).long()
    logits = model(x)
    margin = logits - logits.gather(1, y[:, None])  # [n, C]: logit_t - logit_y
    lam, V = pairs.values[y], pairs.vectors[y]  # [n, C], [n, C, d]
    proj = torch.einsum("ncd,nd->nc", V, x)
    gain = lam * (2 * eps * proj.abs() + eps**2)
    sign = torch.where(proj >= 0, 1.0, -1.0).to(x.dtype)
    if model.cfg.residual:  # the linear path: eps s (W_E (u_t - u_y)) . v
        U = class_directions(model)
        lin = (model.W_E.detach() @ (U[None, :, :] - U[y][:, None, :]).transpose(-1, -2)).transpose(-1, -2)
        gain = gain + eps * sign * (lin * V).sum(-1)
    score = (margin + gain).scatter(1, y[:, None], float("-inf"))
    target = score.argmax(-1)
    v = V[torch.arange(len(x)), target]
    s = sign[torch.arange(len(x)), target]
    return eps * s[:, None] * v, target


def gradient_masks(model: ImageClassifier, x: Tensor, y: Tensor, eps: float) -> Float[Tensor, "n d_input"]:
    """``eps g / |g|`` per image, ``g`` the gradient of the cross-entropy at ``x`` (zero where
    ``g = 0``): the L2 fast gradient method."""
    x = _check_attack_inputs(model, x, y, eps).detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y.to(x.device).long(), reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    norm = g.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, eps * g / norm.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(g)).detach()


def random_masks(model: ImageClassifier, x: Tensor, eps: float, seed: int = 0) -> Float[Tensor, "n d_input"]:
    """Gaussian directions scaled to L2 norm ``eps`` (seeded): the chance baseline."""
    x = model.flatten(x)
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(x)
    return eps * r / r.norm(dim=-1, keepdim=True)


@torch.no_grad()
def flip_rate(model: ImageClassifier, x: Tensor, y: Tensor, delta: Tensor) -> float:
    """Fraction of the correctly classified images of ``x`` whose prediction ``x + delta``
    changes (``nan`` if none is correct)."""
    x = model.flatten(x).to(model.W_U.dtype)
    y = y.to(x.device)
    correct = model(x).argmax(-1) == y
    if not bool(correct.any()):
        return float("nan")
    flipped = model(x + delta).argmax(-1) != y
    return float(flipped[correct].float().mean())


def compare_attacks(
    model: ImageClassifier, x: Tensor, y: Tensor, epsilons: Sequence[float], seed: int = 0,
) -> list[dict[str, float]]:
    """Per ``eps``: the flip rates of the eigen, gradient and random masks of that norm."""
    pairs = pair_eigen(model)
    rows = []
    for eps in epsilons:
        rows.append({
            "eps": float(eps),
            "eigen": flip_rate(model, x, y, eigen_masks(model, x, y, eps, pairs)[0]),
            "gradient": flip_rate(model, x, y, gradient_masks(model, x, y, eps)),
            "random": flip_rate(model, x, y, random_masks(model, x, eps, seed)),
        })
    return rows


__all__ = ["PairEigen", "compare_attacks", "eigen_masks", "flip_rate", "gradient_masks", "pair_eigen", "random_masks"]
