"""Weight-only readings of a bilinear image classifier: per-class eigenvectors as images.

For class ``c`` the output direction is its unembedding column ``u_c = W_U[:, c]``
``[d_model]``, and the first MLP reads ``h_0 = x W_E`` (pixels ``x`` ``[d_input]``), so the
MLP's contribution to logit ``c`` is a quadratic form of the pixels:

    u_c . mlp_0(x W_E) = x^T Q_pix(c) x,     Q_pix(c) = W_E Q(u_c) W_E^T   [d_input, d_input]

with ``Q(u) = sym(W_in diag(W_out u) W_gate^T)``
(:func:`~bilinear_lens.weights.tensor.interaction_matrix`). Its eigendecomposition
``Q_pix(c) = sum_i lambda_i v_i v_i^T`` (:func:`~bilinear_lens.weights.eigen.eigendecompose`)
has pixel-space eigenvectors ``v_i`` that are images (Pearce et al. 2024, §3, Fig. 3:
positive eigenvalues are patterns that raise the class, negative ones lower it), and
``x^T Q_pix(c) x = sum_i lambda_i (v_i . x)^2`` exactly. In a one-layer model without
residual this *is* logit ``c``; with a residual, logit ``c`` adds the linear ``x W_E u_c``;
for layer 0 of a two-layer residual model it is layer 0's direct path to the logits.
With MLP biases (``include_bias``) pixels are augmented to ``[x, 1]`` (``d_input + 1``) and
``W_E`` to ``diag(W_E, 1)``, so the form stays exact (:mod:`bilinear_lens.weights.tensor`).

:func:`low_rank_logits` keeps the top-``k`` eigenpairs (by ``|lambda|``) of every class of
the *last* layer (in pixel space for a one-layer model, in the last MLP's input space
otherwise) and recomputes the logits; at ``k = d`` they equal the model's up to rounding.

Spectrum summaries (:func:`spectral_concentration`, :func:`effective_rank`) and eigenvector
smoothness (:func:`total_variation`) measure how clean and low-rank the readings are: the
paper's regularisation and overfitting comparisons.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.models.image_classifier import ImageClassifier
from bilinear_lens.models.mlp_kinds import mlp_kind_spec
from bilinear_lens.weights.eigen import Eigendecomposition, eigendecompose, eigenvector_activations
from bilinear_lens.weights.tensor import augment_input, interaction_matrices


class ClassEigen(NamedTuple):
    """Per-class eigendecompositions of a layer's reading: ``eigenvalues`` ``[n_classes, d]``
    and ``eigenvectors`` ``[n_classes, d, d]`` (columns, sorted by ``|lambda|`` descending),
    in ``space`` (``"pixels"``: ``d = d_input`` (+1 with bias), or ``"hidden"``: the MLP's
    input, ``d = d_model`` (+1)). ``image_shape`` reshapes a pixel-space eigenvector."""

    eigenvalues: Float[Tensor, "n_classes d"]
    eigenvectors: Float[Tensor, "n_classes d d"]
    space: str
    image_shape: tuple[int, int]
    include_bias: bool

    @property
    def decomposition(self) -> Eigendecomposition:
        return Eigendecomposition(self.eigenvalues, self.eigenvectors)

    def images(self, cls: int, which: str = "positive", top: int = 4) -> tuple[Tensor, Tensor]:
        """The ``top`` eigenvectors of class ``cls`` with the largest positive (``which =
        "positive"``) or most negative (``"negative"``) eigenvalues, as images
        ``[top, height, width]`` (the bias entry dropped), with their eigenvalues ``[top]``."""
        if self.space != "pixels":
            raise ValueError("eigenvectors in the hidden space are not images (space='hidden'); decompose layer 0")
        if which not in ("positive", "negative"):
            raise ValueError(f"which must be 'positive' or 'negative', got {which!r}")
        n = self.eigenvalues.shape[0]
        if not 0 <= cls < n:
            raise ValueError(f"class index {cls} out of range [0, {n})")
        values = self.eigenvalues[cls]
        order = values.argsort(descending=which == "positive")[:top]
        h, w = self.image_shape
        vectors = self.eigenvectors[cls][: h * w, order].T  # [top, d_input]
        return vectors.reshape(-1, h, w), values[order]


def _check_bilinear(model: ImageClassifier, layer: int) -> None:
    if not isinstance(model, ImageClassifier):
        raise TypeError(f"model must be an ImageClassifier, got {type(model).__name__}")
    n = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"layer must be an integer in [0, {n}), got {layer!r}")
    if not mlp_kind_spec(model.cfg.mlp_kind).is_bilinear:
        raise ValueError(f"mlp_kind={model.cfg.mlp_kind!r}: only a bilinear classifier's logits are quadratic forms "
                         "with eigenvectors (train with model.mlp_kind=bilinear)")


def class_directions(model: ImageClassifier, classes: Optional[Sequence[int]] = None) -> Float[Tensor, "n d_model"]:
    """The unembedding columns ``u_c = W_U[:, c]`` of ``classes`` (all by default), as rows."""
    U = model.W_U.detach().T
    if classes is None:
        return U
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < U.shape[0]]
    if bad:
        raise ValueError(f"classes {bad} out of range [0, {U.shape[0]})")
    return U[list(classes)]


def _embedding(model: ImageClassifier, include_bias: bool) -> Tensor:
    """``W_E`` ``[d_input, d_model]``, or ``diag(W_E, 1)`` for the augmented input."""
    W_E = model.W_E.detach()
    if not include_bias:
        return W_E
    out = torch.zeros(W_E.shape[0] + 1, W_E.shape[1] + 1, dtype=W_E.dtype, device=W_E.device)
    out[:-1, :-1], out[-1, -1] = W_E, 1.0
    return out


def pixel_interaction_matrices(
    model: ImageClassifier, U: Optional[Float[Tensor, "n d_model"]] = None, include_bias: Optional[bool] = None,
) -> Float[Tensor, "n d d"]:
    """``Q_pix(u) = W_E Q(u) W_E^T`` of the first MLP for each row ``u`` of ``U`` (default:
    every class's unembedding), so ``x^T Q_pix(u) x = u . mlp_0(x W_E)`` (module docstring).
    ``include_bias`` (default: whether the MLPs have biases) augments the pixels."""
    _check_bilinear(model, 0)
    if model.cfg.n_layers > 1 and not model.cfg.residual:
        raise ValueError("layer 0 of a two-layer model without residual has no direct path to the logits; "
                         "decompose the last layer (low_rank_logits) or train with model.residual=true")
    include_bias = model.cfg.bias if include_bias is None else include_bias
    U = class_directions(model) if U is None else U
    Q = interaction_matrices(model.mlps[0], U.to(model.W_U.dtype), include_bias=include_bias)
    M = _embedding(model, include_bias)
    return M @ Q @ M.T


def class_eigendecomposition(
    model: ImageClassifier, classes: Optional[Sequence[int]] = None, include_bias: Optional[bool] = None,
) -> ClassEigen:
    """Eigendecompositions of ``Q_pix(u_c)`` for ``classes`` (all by default): the
    eigenvectors are images (module docstring)."""
    include_bias = model.cfg.bias if include_bias is None else include_bias
    Q = pixel_interaction_matrices(model, class_directions(model, classes), include_bias)
    eig = eigendecompose(Q)
    return ClassEigen(eig.eigenvalues, eig.eigenvectors, "pixels", model.cfg.image_shape, include_bias)


def last_layer_eigendecomposition(model: ImageClassifier, include_bias: Optional[bool] = None) -> ClassEigen:
    """The per-class reading of the last MLP: in pixel space for a one-layer model
    (:func:`class_eigendecomposition`), else ``Q(u_c)`` in the last MLP's input space."""
    include_bias = model.cfg.bias if include_bias is None else include_bias
    if model.cfg.n_layers == 1:
        return class_eigendecomposition(model, include_bias=include_bias)
    layer = model.cfg.n_layers - 1
    _check_bilinear(model, layer)
    eig = eigendecompose(interaction_matrices(model.mlps[layer], class_directions(model), include_bias=include_bias))
    return ClassEigen(eig.eigenvalues, eig.eigenvectors, "hidden", model.cfg.image_shape, include_bias)


@torch.no_grad()
def low_rank_logits(
    model: ImageClassifier, x: Tensor, k: int, eig: Optional[ClassEigen] = None,
) -> Float[Tensor, "n n_classes"]:
    """Logits with the last MLP's class readings cut to their top-``k`` eigenpairs:
    ``logit_c = [h_L-1 . u_c  (residual)] + sum_{i<k} lambda_ci (v_ci . f)^2`` with ``f`` the
    pixels (one-layer model) or the last MLP's input (``[f, 1]`` with bias). ``k = d`` gives
    the model's logits up to float rounding. ``eig``: :func:`last_layer_eigendecomposition`
    (computed if not given)."""
    eig = last_layer_eigendecomposition(model) if eig is None else eig
    d = eig.eigenvalues.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= d:
        raise ValueError(f"k must be an integer in [0, {d}] (the eigenvectors per class), got {k!r}")
    x = model.flatten(x).to(model.W_U.dtype)
    hs = model.layer_inputs(x)
    h = hs[-2]  # the last MLP's input
    f = x if eig.space == "pixels" else h
    f = augment_input(f) if eig.include_bias else f
    if k == 0:  # eigenvector_activations cannot reshape an empty set of components
        logits = torch.zeros(len(x), eig.eigenvalues.shape[0], dtype=x.dtype, device=x.device)
    else:
        logits = eigenvector_activations(eig.decomposition, f.to(eig.eigenvalues.dtype), k).sum(-1).to(x.dtype)
    if model.cfg.residual:
        logits = logits + h @ model.W_U
    return logits


@torch.no_grad()
def low_rank_accuracy(
    model: ImageClassifier, x: Tensor, y: Tensor, ks: Sequence[int], eig: Optional[ClassEigen] = None,
) -> dict[int, float]:
    """Accuracy on ``(x, y)`` of :func:`low_rank_logits` for each ``k`` in ``ks``."""
    eig = last_layer_eigendecomposition(model) if eig is None else eig
    y = y.to(x.device)
    return {k: float((low_rank_logits(model, x, k, eig).argmax(-1) == y).float().mean()) for k in ks}


def spectral_concentration(eigenvalues: Float[Tensor, "*batch d"], k: int) -> Float[Tensor, "*batch"]:
    """``sum_{i<k} lambda_i^2 / sum_i lambda_i^2`` with ``|lambda|`` sorted descending: the
    share of ``||Q||_F^2`` the top-``k`` eigenpairs hold (1 for ``Q = 0``)."""
    d = eigenvalues.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= d:
        raise ValueError(f"k must be an integer in [0, {d}], got {k!r}")
    sq = eigenvalues.abs().sort(dim=-1, descending=True).values ** 2
    total = sq.sum(-1)
    return torch.where(total > 0, sq[..., :k].sum(-1) / total.clamp_min(torch.finfo(sq.dtype).tiny), 1.0)


def effective_rank(eigenvalues: Float[Tensor, "*batch d"]) -> Float[Tensor, "*batch"]:
    """``exp(H(p))`` with ``p_i = lambda_i^2 / sum_j lambda_j^2``: 1 for a rank-one ``Q``,
    ``d`` for equal magnitudes (Roy & Vetterli 2007, on the squared spectrum)."""
    sq = eigenvalues.double() ** 2
    p = sq / sq.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)
    return entropy.exp().to(eigenvalues.dtype)


def total_variation(images: Float[Tensor, "*batch h w"]) -> Float[Tensor, "*batch"]:
    """Anisotropic total variation ``sum |v[i+1, j] - v[i, j]| + |v[i, j+1] - v[i, j]|`` of
    each image scaled to unit L2 norm: low for smooth strokes, high for pixel noise."""
    if images.ndim < 2:
        raise ValueError(f"images must be [..., height, width], got shape {tuple(images.shape)}")
    norm = images.flatten(-2).norm(dim=-1).clamp_min(torch.finfo(images.dtype).tiny)[..., None, None]
    v = images / norm
    return (v.diff(dim=-2).abs().flatten(-2).sum(-1) + v.diff(dim=-1).abs().flatten(-2).sum(-1))


def pixel_participation(images: Float[Tensor, "*batch h w"]) -> Float[Tensor, "*batch"]:
    """``(sum v^2)^2 / (sum v^4) / (h w)``: the fraction of pixels an image's energy is spread
    over (1: all pixels equal in magnitude, ``1 / (h w)``: one pixel). Lower is sparser."""
    v2 = images.flatten(-2) ** 2
    return v2.sum(-1) ** 2 / (v2**2).sum(-1).clamp_min(torch.finfo(images.dtype).tiny) / v2.shape[-1]


def neighbour_correlation(images: Float[Tensor, "*batch h w"]) -> Float[Tensor, "*batch"]:
    """``sum_{adjacent (p, q)} v_p v_q`` of each image scaled to unit L2 norm (horizontal and
    vertical neighbours): high for smooth patterns, about 0 for pixel noise."""
    norm = images.flatten(-2).norm(dim=-1).clamp_min(torch.finfo(images.dtype).tiny)[..., None, None]
    v = images / norm
    return (v[..., 1:, :] * v[..., :-1, :]).flatten(-2).sum(-1) + (v[..., :, 1:] * v[..., :, :-1]).flatten(-2).sum(-1)


def eigen_summary(eig: ClassEigen, k: int = 4, top_images: int = 4) -> dict[str, float]:
    """Class-averaged ``concentration@k``, ``effective_rank``, ``top_eigenvalue`` (largest
    ``|lambda|``) and, in pixel space, ``total_variation`` of each class's ``top_images``
    largest-``|lambda|`` eigenvectors, with their ``pixel_participation`` and
    ``neighbour_correlation``."""
    out = {f"concentration@{k}": float(spectral_concentration(eig.eigenvalues, k).mean()),
           "effective_rank": float(effective_rank(eig.eigenvalues).mean()),
           "top_eigenvalue": float(eig.eigenvalues.abs().amax(-1).mean())}
    if eig.space == "pixels":
        h, w = eig.image_shape
        vectors = eig.eigenvectors[:, : h * w, :top_images].transpose(-1, -2).reshape(-1, h, w)
        out["total_variation"] = float(total_variation(vectors).mean())
        out["pixel_participation"] = float(pixel_participation(vectors).mean())
        out["neighbour_correlation"] = float(neighbour_correlation(vectors).mean())
    return out


__all__ = [
    "ClassEigen",
    "class_directions",
    "class_eigendecomposition",
    "effective_rank",
    "eigen_summary",
    "last_layer_eigendecomposition",
    "low_rank_accuracy",
    "low_rank_logits",
    "neighbour_correlation",
    "pixel_participation",
    "pixel_interaction_matrices",
    "spectral_concentration",
    "total_variation",
]
