"""The bilinear tensor and interaction matrices against slow, obvious references (float64)."""

from __future__ import annotations

import pytest
import torch

from bilinear_lens.models.mlp import BilinearMLP, GatedMLP
from bilinear_lens.weights.tensor import (
    BilinearWeights,
    augment_input,
    bilinear_output,
    bilinear_tensor,
    interaction,
    interaction_matrices,
    interaction_matrix,
    iter_interaction_matrices,
    quadratic_form,
)

D_MODEL, D_MLP = 6, 10


def make_mlp(bias: bool, seed: int = 0, d_model: int = D_MODEL, d_mlp: int = D_MLP) -> BilinearMLP:
    torch.manual_seed(seed)
    mlp = BilinearMLP(d_model, d_mlp, bias=bias).double()
    if bias:  # nn.Linear biases start small; make them matter
        with torch.no_grad():
            for name in ("in", "gate", "out"):
                getattr(mlp, name).bias.normal_()
    return mlp


def slow_tensor(mlp: BilinearMLP) -> torch.Tensor:
    """B[a, i, j] = sum_h W_out[h, a] W_in[i, h] W_gate[j, h], by explicit loops over h."""
    B = torch.zeros(mlp.d_model, mlp.d_model, mlp.d_model, dtype=torch.float64)
    for h in range(mlp.d_mlp):
        B += torch.einsum("a,i,j->aij", mlp.W_out[h], mlp.W_in[:, h], mlp.W_gate[:, h])
    return B.detach()


def slow_augmented_tensor(mlp: BilinearMLP) -> torch.Tensor:
    """B over [x, 1] with biases, by loops: bias rows appended, b_out in the corner."""
    d = mlp.d_model + 1
    W_in = torch.cat([mlp.W_in, mlp.b_in[None]]).detach()
    W_gate = torch.cat([mlp.W_gate, mlp.b_gate[None]]).detach()
    B = torch.zeros(mlp.d_model, d, d, dtype=torch.float64)
    for a in range(mlp.d_model):
        for h in range(mlp.d_mlp):
            B[a] += mlp.W_out[h, a].item() * torch.outer(W_in[:, h], W_gate[:, h])
        B[a, -1, -1] += mlp.b_out[a].item()
    return B


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(7, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def u() -> torch.Tensor:
    return torch.randn(D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(2))


def test_quadratic_form_reproduces_mlp_without_bias(x: torch.Tensor, u: torch.Tensor) -> None:
    mlp = make_mlp(bias=False)
    Q = interaction_matrix(mlp, u)
    with torch.no_grad():
        expected = mlp(x) @ u
    torch.testing.assert_close(quadratic_form(Q, x), expected)


def test_quadratic_form_reproduces_mlp_with_bias_on_augmented_input(x: torch.Tensor, u: torch.Tensor) -> None:
    mlp = make_mlp(bias=True)
    Q = interaction_matrix(mlp, u, include_bias=True)
    assert Q.shape == (D_MODEL + 1, D_MODEL + 1)
    with torch.no_grad():
        expected = mlp(x) @ u
    torch.testing.assert_close(quadratic_form(Q, augment_input(x)), expected)
    # without the bias row Q is only the quadratic part, which differs here
    assert not torch.allclose(quadratic_form(interaction_matrix(mlp, u), x), expected)


def test_bilinear_output_matches_module(x: torch.Tensor) -> None:
    for bias in (False, True):
        mlp = make_mlp(bias=bias)
        with torch.no_grad():
            torch.testing.assert_close(bilinear_output(mlp, x), mlp(x))


def test_interaction_matrix_is_symmetric(u: torch.Tensor) -> None:
    for bias in (False, True):
        Q = interaction_matrix(make_mlp(bias=bias), u, include_bias=bias)
        torch.testing.assert_close(Q, Q.T, rtol=0, atol=0)


def test_interaction_matrix_equals_contracted_dense_tensor(u: torch.Tensor) -> None:
    mlp = make_mlp(bias=False)
    B = slow_tensor(mlp)
    Bu = torch.einsum("aij,a->ij", B, u)
    torch.testing.assert_close(interaction_matrix(mlp, u), (Bu + Bu.T) / 2)


def test_bilinear_tensor_matches_slow_reference_and_mlp(x: torch.Tensor) -> None:
    mlp = make_mlp(bias=False)
    B = bilinear_tensor(mlp)
    torch.testing.assert_close(B, slow_tensor(mlp))
    with torch.no_grad():
        torch.testing.assert_close(torch.einsum("aij,ni,nj->na", B, x, x), mlp(x))


def test_bilinear_tensor_with_bias_matches_slow_reference_and_mlp(x: torch.Tensor) -> None:
    mlp = make_mlp(bias=True)
    B = bilinear_tensor(mlp, include_bias=True)
    torch.testing.assert_close(B, slow_augmented_tensor(mlp))
    xa = augment_input(x)
    with torch.no_grad():
        torch.testing.assert_close(torch.einsum("aij,ni,nj->na", B, xa, xa), mlp(x))


def test_bilinear_tensor_refuses_large_layers() -> None:
    with pytest.raises(ValueError, match=r"6x6x6 = 216 elements .*interaction_matrix"):
        bilinear_tensor(make_mlp(bias=False), max_elements=100)


@pytest.mark.parametrize("bias", [False, True])
def test_batched_and_chunked_match_one_at_a_time(bias: bool) -> None:
    mlp = make_mlp(bias=bias)
    U = torch.randn(11, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    single = torch.stack([interaction_matrix(mlp, u, include_bias=bias) for u in U])
    for chunk_size in (None, 1, 3, 4, 11, 50):
        batched = interaction_matrices(mlp, U, chunk_size=chunk_size, include_bias=bias)
        torch.testing.assert_close(batched, single)
        chunks = list(iter_interaction_matrices(mlp, U, chunk_size=chunk_size, include_bias=bias))
        assert [c.start for c in chunks] == list(range(0, 11, chunk_size or 11))[: len(chunks)]
        assert chunks[-1].stop == 11
        torch.testing.assert_close(torch.cat([c.matrices for c in chunks]), single)


def test_interaction_equals_explicit_bilinear_computation(u: torch.Tensor) -> None:
    mlp = make_mlp(bias=False)
    gen = torch.Generator().manual_seed(4)
    F1 = torch.randn(3, D_MODEL, dtype=torch.float64, generator=gen)
    F2 = torch.randn(5, D_MODEL, dtype=torch.float64, generator=gen)
    # f1^T Q(u) f2 with Q = sym(sum_h c_h W_in[:, h] W_gate[:, h]^T), summed explicitly
    c = (mlp.W_out @ u).detach()
    W_in, W_gate = mlp.W_in.detach(), mlp.W_gate.detach()
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for p in range(3):
        for q in range(5):
            for h in range(D_MLP):
                expected[p, q] += c[h] * (
                    (F1[p] @ W_in[:, h]) * (F2[q] @ W_gate[:, h]) + (F1[p] @ W_gate[:, h]) * (F2[q] @ W_in[:, h])
                ) / 2
    torch.testing.assert_close(interaction(mlp, u, F1, F2), expected)
    torch.testing.assert_close(interaction(mlp, u, F1[1], F2[2]), expected[1, 2])
    torch.testing.assert_close(interaction(mlp, u, F1[1], F2), expected[1])


def test_interaction_with_bias_matches_augmented_matrix(u: torch.Tensor) -> None:
    mlp = make_mlp(bias=True)
    gen = torch.Generator().manual_seed(5)
    F1 = augment_input(torch.randn(3, D_MODEL, dtype=torch.float64, generator=gen))
    F2 = augment_input(torch.randn(4, D_MODEL, dtype=torch.float64, generator=gen), value=0.5)
    Q = interaction_matrix(mlp, u, include_bias=True)
    torch.testing.assert_close(interaction(mlp, u, F1, F2, include_bias=True), F1 @ Q @ F2.T)
    # an input with itself is the MLP output
    with torch.no_grad():
        torch.testing.assert_close(
            torch.diagonal(interaction(mlp, u, F1, F1, include_bias=True)), mlp(F1[:, :-1]) @ u
        )


def test_weights_container_and_module_agree(u: torch.Tensor) -> None:
    mlp = make_mlp(bias=True)
    w = BilinearWeights.from_module(mlp)
    assert (w.d_model, w.d_mlp, w.d_out) == (D_MODEL, D_MLP, D_MODEL)
    assert not w.W_in.requires_grad
    torch.testing.assert_close(
        interaction_matrix(w, u, include_bias=True), interaction_matrix(mlp, u, include_bias=True)
    )
    plain = BilinearWeights(mlp.W_in.detach(), mlp.W_gate.detach(), mlp.W_out.detach())
    torch.testing.assert_close(interaction_matrix(plain, u), interaction_matrix(mlp, u))


def test_shape_validation_messages() -> None:
    W_in = torch.zeros(4, 8)
    with pytest.raises(ValueError, match=r"W_gate shape \(4, 7\) != W_in shape \(4, 8\)"):
        BilinearWeights(W_in, torch.zeros(4, 7), torch.zeros(8, 4))
    with pytest.raises(ValueError, match=r"W_out shape \(7, 4\) does not start with d_mlp=8"):
        BilinearWeights(W_in, W_in, torch.zeros(7, 4))
    with pytest.raises(ValueError, match=r"b_out shape \(3,\) != \(4,\)"):
        BilinearWeights(W_in, W_in, torch.zeros(8, 4), b_out=torch.zeros(3))
    with pytest.raises(ValueError, match=r"b_in shape \(4,\) != \(8,\)"):
        BilinearWeights(W_in, W_in, torch.zeros(8, 4), b_in=torch.zeros(4))
    with pytest.raises(ValueError, match=r"W_in must be 2-D, got shape \(4, 8, 1\)"):
        BilinearWeights(W_in[..., None], W_in, torch.zeros(8, 4))
    with pytest.raises(ValueError, match=r"W_out is torch.float64 .* but W_in is torch.float32"):
        BilinearWeights(W_in, W_in, torch.zeros(8, 4, dtype=torch.float64))
    w = BilinearWeights(W_in, W_in, torch.zeros(8, 4))
    with pytest.raises(ValueError, match=r"u must be \[d_model\] with d_model=4, got shape \(5,\)"):
        interaction_matrix(w, torch.zeros(5))
    with pytest.raises(ValueError, match=r"U must be \[n_dirs, d_model\] with d_model=4, got shape \(4,\)"):
        interaction_matrices(w, torch.zeros(4))
    with pytest.raises(ValueError, match=r"f2 last dim must be 5 \(include_bias=True"):
        interaction(w, torch.zeros(4), torch.zeros(5), torch.zeros(4), include_bias=True)
    with pytest.raises(ValueError, match=r"x last dim must be 3"):
        quadratic_form(torch.zeros(3, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        interaction_matrices(w, torch.zeros(2, 4), chunk_size=-1)


def test_refuses_non_bilinear_modules() -> None:
    with pytest.raises(ValueError, match="activation 'silu'"):
        BilinearWeights.from_module(GatedMLP(4, 8, act="silu"))
    with pytest.raises(ValueError, match="has no W_in, W_gate, W_out"):
        BilinearWeights.from_module(torch.nn.Linear(3, 3))
