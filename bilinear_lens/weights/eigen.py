"""Eigendecompositions of interaction matrices, exact and matrix-free, and low-rank views.

``Q(u)`` (see :mod:`bilinear_lens.weights.tensor`) is symmetric, so ``Q = sum_i lambda_i v_i v_i^T``
and ``u . MLP(x) = x^T Q x = sum_i lambda_i (v_i . x)^2``: each eigenvector is an input
direction whose squared projection drives the output ``u`` with sign and weight
``lambda_i``. Eigenpairs are always ordered by ``|lambda|`` descending, so "top-k" means
the ``k`` largest-magnitude components, and every eigenvector has the sign fixed by
:func:`canonical_signs` (its largest-``|entry|`` component positive), so every method,
dtype and device returns the same vectors, not ``v`` from one and ``-v`` from another.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh
from torch import Tensor

from bilinear_lens.distributed import resolve_device
from bilinear_lens.weights.tensor import (
    BilinearWeights,
    MLPLike,
    augment_input,
    bilinear_output,
    check_directions,
    check_eigh_dtype,
    check_finite,
    check_vectors,
    input_factors,
    interaction_matrix,
    iter_interaction_matrices,
)

METHODS = ("auto", "lanczos", "block", "dense")
WHICH = ("LM", "LA", "SA")
# ``method="auto"`` forms Q and runs eigh up to this d: measured on 2 cores (random weights,
# d_mlp = 4 d, top-8), dense eigh was as fast as ARPACK at d 512 (0.12 vs 0.16 s) and
# 1024 (0.74 vs 0.80 s) and 5-10x faster than block Krylov; above it Q's d^2 memory and
# eigh's d^3 time grow while the matrix-free solvers need O(d_mlp) per vector.
AUTO_DENSE_MAX_D = 2048


class EigenConvergenceError(RuntimeError):
    """An iterative eigensolver stopped with eigenpairs whose residual is above tolerance."""


class Eigendecomposition(NamedTuple):
    """``Q ~= V diag(eigenvalues) V^T``; columns of ``eigenvectors`` are the ``v_i``.

    Sorted by ``|eigenvalue|`` descending. ``k = d`` for a full decomposition.

    **Sign convention.** ``v`` and ``-v`` are equally eigenvectors, and solvers return
    either (``eigh`` in float32 vs float64, ARPACK, Krylov from a random start). Every
    decomposition this package returns has, for each column ``v_i``,
    ``v_i[j*] > 0`` with ``j* = argmax_j |v_i[j]|``, the lowest such ``j`` on an exact tie
    (:func:`canonical_signs`). So the "+ pole" of an eigenvector (inputs ``x`` with
    ``v_i . x > 0``) is the same for every method, dtype and device. The convention is as
    stable as ``j*`` is: two entries whose magnitudes agree to within the vectors' rounding
    error (float32: ~1e-6 / eigengap) can pick different signs. An eigenvalue of
    multiplicity > 1 has no unique eigenvectors at all (any rotation within its eigenspace).
    """

    eigenvalues: Float[Tensor, "*batch k"]
    eigenvectors: Float[Tensor, "*batch d k"]

    @property
    def k(self) -> int:
        return self.eigenvalues.shape[-1]

    def top(self, k: int) -> "Eigendecomposition":
        """The first ``k`` components (the factored rank-``k`` approximation)."""
        _check_k(k, self.k)
        return Eigendecomposition(self.eigenvalues[..., :k], self.eigenvectors[..., :k])


def _check_k(k: int, available: int) -> None:
    if not 0 <= k <= available:
        raise ValueError(f"k must be in [0, {available}], got {k}")


def canonical_signs(vectors: Float[Tensor, "*batch d m"]) -> Float[Tensor, "*batch d m"]:
    """``vectors`` with each column ``v`` multiplied by ``sign(v[j*])``, ``j* = argmax_j |v[j]|``
    (the lowest ``j`` on an exact tie), so its largest-magnitude entry is positive: the
    :class:`Eigendecomposition` sign convention. A zero column stays zero; idempotent."""
    if vectors.shape[-2] == 0 or vectors.shape[-1] == 0:
        return vectors
    pivot = vectors.abs().argmax(dim=-2, keepdim=True)  # first maximum on ties
    return torch.where(vectors.gather(-2, pivot) < 0, -vectors, vectors)


def sort_by_magnitude(values: Float[Tensor, "*batch m"], vectors: Float[Tensor, "*batch d m"]) -> Eigendecomposition:
    """Eigenpairs reordered by ``|value|`` descending (stable: ties keep their order), with
    the signs of :func:`canonical_signs`. Every solver here ends in this function (the
    batched Krylov one applies :func:`canonical_signs` to the vectors it forms itself)."""
    order = values.abs().argsort(dim=-1, descending=True, stable=True)
    return Eigendecomposition(
        values.gather(-1, order),
        canonical_signs(vectors.gather(-1, order[..., None, :].expand_as(vectors))),
    )


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual the iterative solvers aim for: 1e-10 in float64, 1e-5 in float32."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def relative_residuals(QV: Float[Tensor, "*batch d k"], eig: Eigendecomposition) -> Float[Tensor, "*batch k"]:
    """``||Q v_i - lambda_i v_i|| / max_j |lambda_j|`` for each pair, given ``QV = Q @ eig.eigenvectors``
    (0 for ``Q = 0``)."""
    residual = QV - eig.eigenvectors * eig.eigenvalues[..., None, :]
    scale = eig.eigenvalues.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(eig.eigenvalues.dtype).tiny)
    return residual.norm(dim=-2) / scale


def check_converged(
    apply_Q: Callable[[Float[Tensor, "*batch d m"]], Float[Tensor, "*batch d m"]],
    eig: Eigendecomposition,
    tol: float,
    method: str,
) -> Eigendecomposition:
    """Return ``eig`` if every pair's :func:`relative_residuals` is ``<= 10 tol``, else raise.

    The factor 10 leaves room for the rounding of recomputing ``Q v`` outside the solver.
    Raises :class:`EigenConvergenceError` naming the worst residual and the tolerance.
    """
    worst = float(relative_residuals(apply_Q(eig.eigenvectors), eig).max()) if eig.k else 0.0
    if not worst <= 10 * tol:  # also catches NaN
        raise EigenConvergenceError(
            f"{method} eigensolver did not converge: relative residual {worst:.2e} > {10 * tol:.1e} "
            "(raise maxiter or use method='dense')"
        )
    return eig


def check_matrices(Q: Tensor, what: str, batched: Optional[bool] = None) -> None:
    """Raise ``ValueError`` naming ``what`` unless ``Q`` is ``[..., d, d]`` (``batched=True``:
    exactly ``[n, d, d]``), float32/float64 and finite (the checks every entry point that
    hands formed matrices to ``eigh`` shares)."""
    if not isinstance(Q, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(Q).__name__}")
    expected = "[n, d, d] (a batch of symmetric matrices)" if batched else "[..., d, d]"
    if Q.ndim < 2 or Q.shape[-1] != Q.shape[-2] or (batched and Q.ndim != 3):
        raise ValueError(f"{what} must be {expected}, got shape {tuple(Q.shape)}")
    check_eigh_dtype(Q.dtype, f"{what}.dtype")
    check_finite(Q, what, item_dims=1 if Q.ndim == 2 else 2)


def eigendecompose(Q: Float[Tensor, "*batch d d"]) -> Eigendecomposition:
    """Exact ``Q = V diag(lambda) V^T`` for symmetric (batched) ``Q`` via ``torch.linalg.eigh``.

    Returns all ``d`` pairs sorted by ``|lambda|`` descending. ``Q`` must be symmetric (as
    :func:`~bilinear_lens.weights.tensor.interaction_matrix` returns; ``eigh`` reads one triangle),
    float32 or float64 and finite: anything else is a ``ValueError`` naming the dtype, or the
    rows (the matrices of a batch) holding NaN or inf.
    """
    check_matrices(Q, "Q")
    values, vectors = torch.linalg.eigh(Q)
    return sort_by_magnitude(values, vectors)


def eigendecompose_directions(
    mlp: MLPLike,
    U: Float[Tensor, "n_dirs d_model"],
    k: Optional[int] = None,
    chunk_size: Optional[int] = None,
    include_bias: bool = False,
    device: Union[str, torch.device, None] = None,
    dtype: Optional[torch.dtype] = None,
) -> Eigendecomposition:
    """Top-``k`` (all if ``None``) eigenpairs of ``Q(U[n])`` for every direction.

    Streams :func:`~bilinear_lens.weights.tensor.iter_interaction_matrices` and eigendecomposes
    each chunk, keeping only ``k`` pairs, so peak memory is one chunk plus the
    ``n_dirs * d * k`` result (never all ``n_dirs`` matrices). Computes on ``device`` in
    ``dtype`` (default: the weights'). For many directions with small ``k``,
    :func:`~bilinear_lens.weights.atlas.build_atlas` is several times faster.

    ``device`` follows :func:`bilinear_lens.distributed.resolve_device` (a name or a
    ``torch.device``), ``dtype`` must be float32 or float64, and ``U`` and the weights must
    be finite: anything else is a one-line ``ValueError`` naming the argument and value.
    """
    device = None if device is None else resolve_device(device, what="device")
    w = BilinearWeights.from_module(mlp)
    check_eigh_dtype(w.dtype if dtype is None else dtype, "dtype", weights=dtype is None)
    check_weights_finite(w)
    w = w.to(device, dtype)
    U = check_directions(w, U, "U", ndim=2)
    d = w.d_input(include_bias)
    k = d if k is None else k
    _check_k(k, d)
    values = torch.empty(U.shape[0], k, dtype=w.dtype, device=w.device)
    vectors = torch.empty(U.shape[0], d, k, dtype=w.dtype, device=w.device)
    for chunk in iter_interaction_matrices(w, U, chunk_size, include_bias):
        eig = eigendecompose(chunk.matrices).top(k)
        values[chunk.start : chunk.stop] = eig.eigenvalues
        vectors[chunk.start : chunk.stop] = eig.eigenvectors
    return Eigendecomposition(values, vectors)


def check_weights_finite(w: BilinearWeights, where: str = "") -> None:
    """``ValueError`` naming the weight (and ``where``, e.g. ``"layer 3 "``) holding NaN or inf."""
    for name in ("W_in", "W_gate", "W_out", "b_in", "b_gate", "b_out"):
        value = getattr(w, name)
        if value is not None:
            check_finite(value, f"{where}{name}")


def _is_zero_operator(w: BilinearWeights, u: Tensor, include_bias: bool) -> bool:
    """Whether ``Q(u)`` is exactly zero because no neuron both reads and writes along ``u``:
    ``c = W_out u`` is zero wherever ``L`` and ``R`` columns are nonzero (zero ``u``, zero
    weights), and so is the ``b_out`` corner."""
    u = check_directions(w, u, "u", ndim=1)
    L, R = input_factors(w, include_bias)
    active = (w.W_out @ u) != 0
    if include_bias and w.b_out is not None and float(u @ w.b_out) != 0:
        return False
    return not bool(active.any()) or not bool(L[:, active].any()) or not bool(R[:, active].any())


def _interaction_matmat(
    w: BilinearWeights, u: Tensor, include_bias: bool
) -> Callable[[Float[Tensor, "d m"]], Float[Tensor, "d m"]]:
    """``V -> Q(u) V`` for ``V [d, m]`` from the factors (shared by the matrix-free solvers)."""
    u = check_directions(w, u, "u", ndim=1)
    L, R = input_factors(w, include_bias)
    c = (w.W_out @ u)[:, None]
    corner = float(u @ w.b_out) if include_bias and w.b_out is not None else 0.0

    def matmat(V: Tensor) -> Tensor:
        out = (L @ (c * (R.T @ V)) + R @ (c * (L.T @ V))) / 2
        if corner:
            out[-1] += corner * V[-1]
        return out

    return matmat


def interaction_operator(mlp: MLPLike, u: Float[Tensor, "d_model"], include_bias: bool = False) -> LinearOperator:
    """``Q(u)`` as a scipy ``LinearOperator`` that never forms ``Q``.

    ``Q v = (L (c * (R^T v)) + R (c * (L^T v))) / 2`` with ``c = W_out u``, ``L = W_in``,
    ``R = W_gate`` (bias rows appended with ``include_bias``, plus ``(u . b_out) v_last``
    in the last entry). Memory: the weights plus ``O(d_model + d_mlp)`` per vector.
    """
    w = BilinearWeights.from_module(mlp)
    apply_Q = _interaction_matmat(w, u, include_bias)
    d = w.d_input(include_bias)
    np_dtype = torch.empty(0, dtype=w.dtype).numpy().dtype

    def matmat(V: np.ndarray) -> np.ndarray:
        Vt = torch.as_tensor(np.asarray(V, dtype=np_dtype)).to(w.device).reshape(d, -1)
        return apply_Q(Vt).cpu().numpy()

    return LinearOperator(
        (d, d),
        matvec=lambda v: matmat(v).reshape(-1),
        matmat=matmat,
        rmatvec=lambda v: matmat(v).reshape(-1),  # symmetric
        dtype=np_dtype,
    )


def choose_method(d: int) -> str:
    """What ``method="auto"`` runs for a ``d x d`` ``Q``: ``"dense"`` up to
    :data:`AUTO_DENSE_MAX_D`, else ``"lanczos"`` (matrix-free)."""
    return "dense" if d <= AUTO_DENSE_MAX_D else "lanczos"


def top_eigenvectors(
    mlp: MLPLike,
    u: Float[Tensor, "d_model"],
    k: int = 8,
    method: str = "auto",
    which: str = "LM",
    include_bias: bool = False,
    tol: float = 0.0,
    maxiter: Optional[int] = None,
    seed: int = 0,
    block_size: int = 16,
    max_basis: int = 512,
) -> Eigendecomposition:
    """``k`` extreme eigenpairs of ``Q(u)``; the iterative methods never form ``Q``.

    ``which``: ``"LM"`` the ``k`` largest ``|lambda|`` (default), ``"LA"`` the most
    positive, ``"SA"`` the most negative (each returned sorted by ``|lambda|``).
    ``method``: ``"auto"`` (:func:`choose_method` by size), ``"dense"`` (form ``Q`` and
    ``eigh``: exact, ``O(d^2)`` memory, the reference), ``"lanczos"`` (ARPACK ``eigsh`` on
    :func:`interaction_operator`) or ``"block"`` (block Krylov with Rayleigh-Ritz in torch,
    :func:`block_krylov_eigenpairs`; ``block_size`` vectors per product). ``tol=0`` means
    :func:`default_tol`. Iterative results are checked: a pair whose relative residual
    ``||Q v - lambda v|| / max|lambda|`` exceeds ``10 tol`` raises
    :class:`EigenConvergenceError` (never an unconverged result). An exactly zero ``Q(u)``
    (a zero ``u`` or zero weights) has every eigenvalue 0: the iterative methods return
    that directly (eigenvectors the first ``k`` unit vectors), as ARPACK cannot start.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    for name, value in (("block_size", block_size), ("max_basis", max_basis)) + ((("maxiter", maxiter),) if maxiter is not None else ()):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    w = BilinearWeights.from_module(mlp)
    check_eigh_dtype(w.dtype, None, weights=True)  # no dtype argument here: convert the module
    d = w.d_input(include_bias)
    if not 1 <= k <= d:
        raise ValueError(f"k must be in [1, {d}], got {k}")
    method = choose_method(d) if method == "auto" else method
    if method != "dense" and _is_zero_operator(w, u, include_bias):
        eye = torch.eye(d, k, dtype=w.dtype, device=w.device)
        return Eigendecomposition(eye.new_zeros(k), eye)
    if method == "lanczos" and k >= d - 1:  # ARPACK needs k < d - 1; dense is exact
        method = "dense"
    if method == "dense":
        return _dense_top(w, u, k, which, include_bias)

    tol = tol if tol > 0 else default_tol(w.dtype)
    apply_Q = _interaction_matmat(w, u, include_bias)
    if method == "block":
        gen = torch.Generator(device=w.device).manual_seed(seed)
        start = torch.randn(d, min(block_size, d), dtype=w.dtype, device=w.device, generator=gen)
        return block_krylov_eigenpairs(apply_Q, start, k, which, tol, maxiter, max_basis)
    return check_converged(apply_Q, _arpack(w, u, k, which, include_bias, maxiter, seed), tol, "lanczos")


def _arpack(
    w: BilinearWeights, u: Tensor, k: int, which: str, include_bias: bool, maxiter: Optional[int], seed: int
) -> Eigendecomposition:
    """ARPACK ``eigsh`` at machine precision; its no-convergence error becoming ours."""
    op = interaction_operator(w, u, include_bias)
    v0 = np.random.default_rng(seed).standard_normal(op.shape[0]).astype(op.dtype)
    try:
        values, vectors = eigsh(op, k=k, which=which, tol=0, maxiter=maxiter, v0=v0)
    except ArpackNoConvergence as err:
        raise EigenConvergenceError(
            f"lanczos eigensolver did not converge: {len(err.eigenvalues)} of {k} pairs reached ARPACK's "
            "residual tolerance (raise maxiter or use method='dense')"
        ) from None
    except ArpackError as err:  # e.g. an operator that maps every start vector to zero
        raise EigenConvergenceError(f"lanczos eigensolver failed ({err}); use method='dense'") from None
    return sort_by_magnitude(
        torch.as_tensor(values).to(dtype=w.dtype, device=w.device),
        torch.as_tensor(vectors).to(dtype=w.dtype, device=w.device),
    )


def _dense_top(w: BilinearWeights, u: Tensor, k: int, which: str, include_bias: bool) -> Eigendecomposition:
    """The reference for :func:`top_eigenvectors`: form ``Q(u)``, ``eigh``, keep ``which``."""
    values, vectors = torch.linalg.eigh(interaction_matrix(w, u, include_bias))
    if which == "LA":
        values, vectors = values[-k:], vectors[:, -k:]
    elif which == "SA":
        values, vectors = values[:k], vectors[:, :k]
    return sort_by_magnitude(values, vectors).top(k)


def _select(values: Tensor, which: str) -> Tensor:
    """Order in which Ritz values are wanted: by |value|, most positive, or most negative."""
    key = {"LM": values.abs(), "LA": values, "SA": -values}[which]
    return key.argsort(descending=True, stable=True)


def block_krylov_eigenpairs(
    apply_Q: Callable[[Float[Tensor, "d m"]], Float[Tensor, "d m"]],
    start: Float[Tensor, "d b"],
    k: int,
    which: str = "LM",
    tol: float = 0.0,
    maxiter: Optional[int] = None,
    max_basis: int = 512,
) -> Eigendecomposition:
    """``k`` extreme eigenpairs of the symmetric operator ``apply_Q`` by block Krylov + Rayleigh-Ritz.

    Grows an orthonormal basis ``V`` by ``b`` vectors a step (the residuals
    ``Q x - theta x`` of the wanted Ritz pairs, which extend the block Krylov space), with
    Ritz pairs from ``eigh(V^T Q V)``. Stops when every wanted pair has
    ``||Q x - theta x|| <= tol * max|theta|`` (``tol=0``: :func:`default_tol`); past
    ``max_basis`` columns it restarts from the best ``max_basis / 2`` Ritz vectors (thick
    restart). Applying ``Q`` to ``b`` vectors at once reads the weights once per block
    instead of once per vector. Raises :class:`EigenConvergenceError` (naming the
    residual) when ``maxiter`` steps or a breakdown end it unconverged.
    """
    d, b = start.shape
    eps = torch.finfo(start.dtype).eps
    tol = tol if tol > 0 else default_tol(start.dtype)
    maxiter = maxiter or 10 * d
    max_basis = max(max_basis, 2 * (k + b))
    V = torch.linalg.qr(start).Q
    AV = apply_Q(V)
    H = V.T @ AV  # V^T Q V, grown block by block
    for _ in range(maxiter):
        theta, Y = torch.linalg.eigh((H + H.T) / 2)
        order = _select(theta, which)
        theta, Y = theta[order], Y[:, order]
        m = min(k + b, Y.shape[1])  # only the wanted Ritz vectors are formed
        X, AX = V @ Y[:, :m], AV @ Y[:, :m]
        residuals = AX - X * theta[:m]
        norms = residuals.norm(dim=0)
        scale = theta.abs().max().clamp_min(eps)
        if bool((norms[:k] <= tol * scale).all()) or V.shape[1] >= d:
            return sort_by_magnitude(theta[:k], X[:, :k])  # converged, or exact: V spans R^d
        if V.shape[1] + b > max_basis:
            keep = max_basis // 2
            V, AV, H = V @ Y[:, :keep], AV @ Y[:, :keep], torch.diag(theta[:keep])
        # Extend with the residuals of the first b unconverged wanted pairs.
        unconverged = (norms > tol * scale).nonzero().flatten()[:b]
        W = residuals[:, unconverged]
        for _ in range(2):  # twice is enough (Kahan) for orthogonality to V
            W = W - V @ (V.T @ W)
        W = W[:, W.norm(dim=0) > eps * d * scale]
        if W.shape[1] == 0:
            break  # breakdown: the residuals lie in the basis already
        W = torch.linalg.qr(W).Q[:, : d - V.shape[1]]
        AW = apply_Q(W)
        cross = V.T @ AW
        H = torch.cat([torch.cat([H, cross], dim=1), torch.cat([cross.T, W.T @ AW], dim=1)], dim=0)
        V, AV = torch.cat([V, W], dim=1), torch.cat([AV, AW], dim=1)
    return check_converged(apply_Q, sort_by_magnitude(theta[:k], X[:, :k]), tol, "block")


def low_rank_approximation(eig: Eigendecomposition, k: int) -> Float[Tensor, "*batch d d"]:
    """``Q_k = sum_{i<k} lambda_i v_i v_i^T``: the best rank-``k`` approximation (Frobenius).

    ``eig.top(k)`` is the same approximation in factored form (``O(d k)`` numbers).
    """
    top = eig.top(k)
    return (top.eigenvectors * top.eigenvalues[..., None, :]) @ top.eigenvectors.mT


def low_rank_error(Q: Union[Float[Tensor, "*batch d d"], Eigendecomposition], k: int) -> Float[Tensor, "*batch"]:
    """Fraction of the Frobenius norm the rank-``k`` approximation misses.

    ``sqrt(sum_{i>=k} lambda_i^2 / sum_i lambda_i^2) = ||Q - Q_k||_F / ||Q||_F`` with the
    eigenvalues sorted by ``|lambda|`` descending (0 for ``Q = 0``). ``Q`` may be a matrix
    or a *full* :class:`Eigendecomposition`.
    """
    eig = Q if isinstance(Q, Eigendecomposition) else eigendecompose(Q)
    _check_k(k, eig.k)
    squares = eig.eigenvalues**2
    total = squares.sum(-1)
    tail = squares[..., k:].sum(-1)
    return torch.where(total > 0, tail / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0).sqrt()


def eigenvector_activations(
    eig: Eigendecomposition, x: Float[Tensor, "*x_batch d"], k: Optional[int] = None
) -> Float[Tensor, "*x_batch *eig_batch k"]:
    """``lambda_i (v_i . x)^2`` for the top-``k`` components (all if ``None``).

    Summed over all ``d`` components this is ``x^T Q x`` (``= u . MLP(x)``). ``x`` must
    live where ``Q`` does (augment it with :func:`~bilinear_lens.weights.tensor.augment_input`
    for a bias-inclusive decomposition). A batched ``eig`` gives one block per matrix.
    """
    eig = eig.top(eig.k if k is None else k)
    d = eig.eigenvectors.shape[-2]
    check_vectors(x, d, "x", include_bias=False)
    batch = eig.eigenvalues.shape[:-1]
    V = eig.eigenvectors.reshape(-1, d, eig.k)
    projections = torch.einsum("...d,edk->...ek", x.to(V.dtype), V)
    acts = eig.eigenvalues.reshape(-1, eig.k) * projections**2
    return acts.reshape(*x.shape[:-1], *batch, eig.k)


def low_rank_output(
    eig: Eigendecomposition, x: Float[Tensor, "*x_batch d"], k: Optional[int] = None
) -> Float[Tensor, "*x_batch *eig_batch"]:
    """``sum_{i<k} lambda_i (v_i . x)^2``: the rank-``k`` approximation of ``u . MLP(x)``."""
    return eigenvector_activations(eig, x, k).sum(-1)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))


def low_rank_correlation(
    mlp: MLPLike,
    u: Float[Tensor, "d_model"],
    x: Float[Tensor, "n d_model"],
    k: Union[int, Sequence[int]],
    eig: Optional[Eigendecomposition] = None,
    include_bias: bool = False,
) -> Union[Float[Tensor, ""], Float[Tensor, "n_k"]]:
    """Pearson correlation over inputs ``x`` between ``u . MLP(x)`` and its rank-``k`` output.

    ``corr_n(u . MLP(x_n), sum_{i<k} lambda_i (v_i . x_n')^2)`` with ``x' = [x, 1]`` under
    ``include_bias`` (the paper's Figure 9 measure). ``u . MLP(x)`` always includes every
    bias the MLP has, so without ``include_bias`` a biased MLP is not reproduced exactly.
    ``eig`` (the decomposition of ``Q(u)`` with at least ``max(k)`` pairs) is computed
    exactly if not given. Returns a scalar for an int ``k``, one value per ``k`` otherwise.
    """
    w = BilinearWeights.from_module(mlp)
    u = check_directions(w, u, "u", ndim=1)
    if x.ndim != 2:
        raise ValueError(f"x must be [n, d_model], got shape {tuple(x.shape)}")
    true = bilinear_output(w, x) @ u
    eig = eig if eig is not None else eigendecompose(interaction_matrix(w, u, include_bias))
    x_q = augment_input(x.to(w.dtype)) if include_bias else x
    ks = [k] if isinstance(k, int) else list(k)
    # Cumulative sums give every rank-k output from one pass over the components.
    acts = eigenvector_activations(eig, x_q, max(ks)).cumsum(-1)
    approx = torch.stack([acts[:, kk - 1] if kk > 0 else torch.zeros_like(true) for kk in ks], dim=1)
    corr = _pearson(true[:, None].expand_as(approx), approx)
    return corr[0] if isinstance(k, int) else corr


__all__ = [
    "AUTO_DENSE_MAX_D",
    "EigenConvergenceError",
    "Eigendecomposition",
    "canonical_signs",
    "check_converged",
    "check_matrices",
    "check_weights_finite",
    "choose_method",
    "default_tol",
    "relative_residuals",
    "sort_by_magnitude",
    "eigendecompose",
    "eigendecompose_directions",
    "eigenvector_activations",
    "block_krylov_eigenpairs",
    "interaction_operator",
    "low_rank_approximation",
    "low_rank_correlation",
    "low_rank_error",
    "low_rank_output",
    "top_eigenvectors",
]
