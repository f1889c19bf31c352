"""Eigendecompositions of interaction matrices: exact, matrix-free, low-rank (float64)."""

from __future__ import annotations

import pytest
import torch

from bilinear_lens.weights.eigen import (
    AUTO_DENSE_MAX_D,
    EigenConvergenceError,
    Eigendecomposition,
    choose_method,
    eigendecompose,
    eigendecompose_directions,
    eigenvector_activations,
    interaction_operator,
    low_rank_approximation,
    low_rank_correlation,
    low_rank_error,
    low_rank_output,
    top_eigenvectors,
)
from bilinear_lens.models.mlp import BilinearMLP
from bilinear_lens.weights.tensor import BilinearWeights, augment_input, interaction_matrices, interaction_matrix

D_MODEL, D_MLP = 8, 16


def make_mlp(bias: bool = False, d_model: int = D_MODEL, d_mlp: int = D_MLP, seed: int = 0) -> BilinearMLP:
    torch.manual_seed(seed)
    mlp = BilinearMLP(d_model, d_mlp, bias=bias).double()
    if bias:
        with torch.no_grad():
            for name in ("in", "gate", "out"):
                getattr(mlp, name).bias.normal_()
    return mlp


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_eigh_reconstructs_and_sorts_by_magnitude() -> None:
    mlp = make_mlp()
    Q = interaction_matrices(mlp, randn(5, D_MODEL, seed=1))
    eig = eigendecompose(Q)
    assert eig.eigenvalues.shape == (5, D_MODEL) and eig.eigenvectors.shape == (5, D_MODEL, D_MODEL)
    V, lam = eig.eigenvectors, eig.eigenvalues
    torch.testing.assert_close(V @ torch.diag_embed(lam) @ V.mT, Q)
    torch.testing.assert_close(V.mT @ V, torch.eye(D_MODEL, dtype=torch.float64).expand(5, -1, -1))
    magnitudes = lam.abs()
    assert (magnitudes[:, :-1] >= magnitudes[:, 1:]).all()
    # eigenpairs really are eigenpairs
    torch.testing.assert_close(Q @ V, V * lam[:, None, :])


def test_eigendecompose_directions_matches_per_direction() -> None:
    mlp = make_mlp(bias=True)
    U = randn(7, D_MODEL, seed=2)
    for chunk_size in (1, 3, 7):
        got = eigendecompose_directions(mlp, U, k=3, chunk_size=chunk_size, include_bias=True)
        for n, u in enumerate(U):
            ref = eigendecompose(interaction_matrix(mlp, u, include_bias=True)).top(3)
            torch.testing.assert_close(got.eigenvalues[n], ref.eigenvalues)
            torch.testing.assert_close(got.eigenvectors[n], ref.eigenvectors)  # signs too: one convention


def test_interaction_operator_matches_dense_matrix() -> None:
    for bias in (False, True):
        mlp = make_mlp(bias=bias)
        u = randn(D_MODEL, seed=3)
        Q = interaction_matrix(mlp, u, include_bias=bias)
        op = interaction_operator(mlp, u, include_bias=bias)
        V = randn(Q.shape[0], 3, seed=4)
        torch.testing.assert_close(torch.as_tensor(op.matmat(V.numpy())), Q @ V)
        torch.testing.assert_close(torch.as_tensor(op.matvec(V[:, 0].numpy())), Q @ V[:, 0])


def assert_same_eigenpairs(got: Eigendecomposition, ref: Eigendecomposition) -> None:
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, rtol=1e-6, atol=0)
    overlaps = (got.eigenvectors * ref.eigenvectors).sum(0)  # signed: every method follows the sign convention
    assert (overlaps > 1 - 1e-6).all(), overlaps


def trained_like_weights(spectrum: torch.Tensor, d_mlp: int, seed: int) -> tuple[BilinearWeights, torch.Tensor]:
    """Weights whose ``Q(u)`` has exactly ``spectrum`` as eigenvalues, in a random basis.

    ``W_in = W_gate = [E, 0]`` (``E`` orthogonal, the extra neurons read nothing) and
    ``W_out u = [spectrum, *]``, so ``Q(u) = E diag(spectrum) E^T``; the other rows of
    ``W_out`` are random, as in a trained layer whose other outputs use the same neurons.
    """
    d = spectrum.numel()
    gen = torch.Generator().manual_seed(seed)
    E = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen)).Q
    W_in = torch.cat([E, torch.zeros(d, d_mlp - d, dtype=torch.float64)], dim=1)
    u = torch.randn(d, dtype=torch.float64, generator=gen)
    W_out = torch.randn(d_mlp, d, dtype=torch.float64, generator=gen)
    W_out[:d] += (spectrum - W_out[:d] @ u)[:, None] * u[None, :] / (u @ u)  # now W_out[:d] @ u = spectrum
    return BilinearWeights(W_in, W_in.clone(), W_out), u


def trained_like_spectrum(d: int, seed: int) -> torch.Tensor:
    """Clustered top eigenvalues of both signs (1, -0.999, 0.998, ...) over a decaying, mixed-sign bulk."""
    gen = torch.Generator().manual_seed(seed)
    top = torch.tensor([1.0, -0.999, 0.998, -0.997, 0.99, 0.985, -0.98, 0.5], dtype=torch.float64)
    bulk = 0.3 * torch.rand(d - top.numel(), dtype=torch.float64, generator=gen) ** 2
    signs = torch.where(torch.rand(bulk.shape, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    return torch.cat([top, bulk * signs])


def random_case() -> tuple[BilinearMLP, torch.Tensor]:
    return make_mlp(d_model=64, d_mlp=128, seed=5), randn(64, seed=6)


def trained_like_case() -> tuple[BilinearWeights, torch.Tensor]:
    return trained_like_weights(trained_like_spectrum(64, seed=7), d_mlp=96, seed=8)


@pytest.mark.parametrize("case", [random_case, trained_like_case])
@pytest.mark.parametrize("method", ["auto", "lanczos", "block"])
@pytest.mark.parametrize("which", ["LM", "LA", "SA"])
def test_every_method_matches_dense_eigh(case, method: str, which: str) -> None:
    mlp, u = case()
    k = 4
    ref = top_eigenvectors(mlp, u, k, method="dense", which=which)
    got = top_eigenvectors(mlp, u, k, method=method, which=which)
    assert got.eigenvalues.shape == (k,) and got.eigenvectors.shape == (64, k)
    assert_same_eigenpairs(got, ref)
    if which == "LA":
        assert (ref.eigenvalues > 0).all()
    if which == "SA":
        assert (ref.eigenvalues < 0).all()


def test_trained_like_weights_have_the_prescribed_spectrum() -> None:
    spectrum = trained_like_spectrum(64, seed=7)
    w, u = trained_like_weights(spectrum, d_mlp=96, seed=8)
    got = eigendecompose(interaction_matrix(w, u)).eigenvalues
    want = spectrum[spectrum.abs().argsort(descending=True)]
    torch.testing.assert_close(got, want)  # float64 eigh of an exactly orthogonal similarity


@pytest.mark.parametrize("method", ["lanczos", "block"])
def test_unconverged_solvers_raise_naming_the_residual(method: str) -> None:
    w, u = trained_like_case()
    # One iteration on a clustered spectrum cannot reach the float64 tolerance.
    with pytest.raises(EigenConvergenceError, match=f"{method} eigensolver did not converge: .*(residual|tolerance)"):
        top_eigenvectors(w, u, 4, method=method, maxiter=1, block_size=4)


def test_auto_picks_dense_for_small_and_lanczos_for_large() -> None:
    assert choose_method(64) == "dense" and choose_method(AUTO_DENSE_MAX_D) == "dense"
    assert choose_method(AUTO_DENSE_MAX_D + 1) == "lanczos"


def test_dense_top_k_is_head_of_full_decomposition() -> None:
    mlp = make_mlp(bias=True)
    u = randn(D_MODEL, seed=7)
    full = eigendecompose(interaction_matrix(mlp, u, include_bias=True))
    top = top_eigenvectors(mlp, u, 3, method="dense", include_bias=True)
    torch.testing.assert_close(top.eigenvalues, full.eigenvalues[:3])
    mf = top_eigenvectors(mlp, u, 3, method="lanczos", include_bias=True)
    assert_same_eigenpairs(mf, top)


def test_low_rank_approximation_exact_at_full_rank_and_error_decreases() -> None:
    mlp = make_mlp()
    Q = interaction_matrix(mlp, randn(D_MODEL, seed=8))
    eig = eigendecompose(Q)
    torch.testing.assert_close(low_rank_approximation(eig, D_MODEL), Q)
    errors = torch.stack([low_rank_error(Q, k) for k in range(D_MODEL + 1)])
    assert errors[0].item() == pytest.approx(1.0)
    assert errors[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert (errors[1:] <= errors[:-1]).all() and (errors[1:] < errors[:-1]).any()
    for k in range(D_MODEL + 1):  # the documented formula: ||Q - Q_k||_F / ||Q||_F
        residual = torch.linalg.matrix_norm(Q - low_rank_approximation(eig, k)) / torch.linalg.matrix_norm(Q)
        torch.testing.assert_close(errors[k], residual)
        torch.testing.assert_close(low_rank_error(eig, k), errors[k])
    assert low_rank_error(torch.zeros(3, 3, dtype=torch.float64), 1).item() == 0.0


def test_eigenvector_activations_sum_to_mlp_output() -> None:
    x = randn(9, D_MODEL, seed=9)
    u = randn(D_MODEL, seed=10)
    for bias in (False, True):
        mlp = make_mlp(bias=bias)
        eig = eigendecompose(interaction_matrix(mlp, u, include_bias=bias))
        xq = augment_input(x) if bias else x
        acts = eigenvector_activations(eig, xq)
        assert acts.shape == (9, eig.k)
        with torch.no_grad():
            expected = mlp(x) @ u
        torch.testing.assert_close(acts.sum(-1), expected)
        torch.testing.assert_close(low_rank_output(eig, xq, eig.k), expected)
        # explicit lambda_i (v_i . x)^2 for the top 2
        explicit = torch.stack([eig.eigenvalues[i] * (xq @ eig.eigenvectors[:, i]) ** 2 for i in range(2)], -1)
        torch.testing.assert_close(eigenvector_activations(eig, xq, 2), explicit)


def test_eigenvector_activations_batched_over_directions() -> None:
    mlp = make_mlp()
    U = randn(4, D_MODEL, seed=11)
    x = randn(6, D_MODEL, seed=12)
    eig = eigendecompose(interaction_matrices(mlp, U))
    acts = eigenvector_activations(eig, x, 3)
    assert acts.shape == (6, 4, 3)
    for n in range(4):
        single = Eigendecomposition(eig.eigenvalues[n], eig.eigenvectors[n])
        torch.testing.assert_close(acts[:, n], eigenvector_activations(single, x, 3))
    with torch.no_grad():
        torch.testing.assert_close(low_rank_output(eig, x), mlp(x) @ U.T)


def test_low_rank_correlation() -> None:
    x = randn(200, D_MODEL, seed=13)
    u = randn(D_MODEL, seed=14)
    for bias in (False, True):
        mlp = make_mlp(bias=bias)
        corr = low_rank_correlation(mlp, u, x, [1, 2, D_MODEL + int(bias)], include_bias=bias)
        assert corr.shape == (3,)
        assert corr[-1].item() == pytest.approx(1.0, abs=1e-12)
        # the obvious computation for k = 2
        eig = eigendecompose(interaction_matrix(mlp, u, include_bias=bias))
        xq = augment_input(x) if bias else x
        with torch.no_grad():
            stacked = torch.stack([mlp(x) @ u, low_rank_output(eig, xq, 2)])
        torch.testing.assert_close(corr[1], torch.corrcoef(stacked)[0, 1])
        torch.testing.assert_close(low_rank_correlation(mlp, u, x, 2, eig=eig, include_bias=bias), corr[1])


def test_argument_validation() -> None:
    mlp = make_mlp()
    u = randn(D_MODEL, seed=15)
    with pytest.raises(ValueError, match="method must be one of"):
        top_eigenvectors(mlp, u, 2, method="power")
    with pytest.raises(ValueError, match="which must be one of"):
        top_eigenvectors(mlp, u, 2, which="BE")
    with pytest.raises(ValueError, match=r"k must be in \[1, 8\], got 9"):
        top_eigenvectors(mlp, u, 9)
    with pytest.raises(ValueError, match=r"Q must be \[..., d, d\], got shape \(3, 4\)"):
        eigendecompose(torch.zeros(3, 4))
    eig = eigendecompose(interaction_matrix(mlp, u))
    with pytest.raises(ValueError, match=r"k must be in \[0, 8\], got 9"):
        low_rank_approximation(eig, 9)
    with pytest.raises(ValueError, match=r"x last dim must be 8"):
        eigenvector_activations(eig, torch.zeros(2, 9, dtype=torch.float64))
