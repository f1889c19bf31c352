"""The bilinear MLP equals its tensor form, checked against slow obvious references."""

import pytest
import torch

from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.mlp import MLP, BilinearMLP, GatedMLP, make_mlp
from bilinear_lens.models.mlp_kinds import MLP_KINDS

D_MODEL, D_MLP = 6, 10


def random_bilinear(bias: bool, seed: int = 0) -> BilinearMLP:
    torch.manual_seed(seed)
    mlp = BilinearMLP(D_MODEL, D_MLP, bias=bias).double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()
    return mlp


def slow_tensor(mlp: BilinearMLP) -> torch.Tensor:
    """B[a, i, j] = sum_h P[a, h] W[h, i] V[h, j] by explicit loops (math orientation)."""
    W, V, P = mlp.W_in.T, mlp.W_gate.T, mlp.W_out.T  # [d_mlp, d_model], [d_mlp, d_model], [d_model, d_mlp]
    B = torch.zeros(D_MODEL, D_MODEL, D_MODEL, dtype=torch.float64)
    for a in range(D_MODEL):
        for h in range(D_MLP):
            B[a] += P[a, h] * torch.outer(W[h], V[h])
    return B


def augmented(mlp: BilinearMLP):
    """Weights acting on [x, 1]: biases become an extra input column."""
    W = torch.cat([mlp.W_in.T, mlp.b_in[:, None]], dim=1)
    V = torch.cat([mlp.W_gate.T, mlp.b_gate[:, None]], dim=1)
    return W, V, mlp.W_out.T, mlp.b_out


def test_forward_matches_formula():
    mlp = random_bilinear(bias=True)
    x = torch.randn(4, 5, D_MODEL, dtype=torch.float64)
    W, V, P, b = mlp.W_in.T, mlp.W_gate.T, mlp.W_out.T, mlp.b_out
    expected = ((x @ W.T + mlp.b_in) * (x @ V.T + mlp.b_gate)) @ P.T + b
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)


def test_output_equals_dense_tensor_contraction():
    mlp = random_bilinear(bias=False)
    B = slow_tensor(mlp)
    x = torch.randn(7, D_MODEL, dtype=torch.float64)
    expected = torch.einsum("aij,ni,nj->na", B, x, x)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-10, atol=1e-10)


def test_direction_output_is_quadratic_form():
    """u . MLP(x) == x^T Q(u) x with Q(u) = sym(W_in^T diag(W_out^T u) W_gate) (math orientation)."""
    mlp = random_bilinear(bias=False)
    u = torch.randn(D_MODEL, dtype=torch.float64)
    W, V, P = mlp.W_in.T, mlp.W_gate.T, mlp.W_out.T
    Q = W.T @ torch.diag(P.T @ u) @ V
    Q = (Q + Q.T) / 2
    x = torch.randn(9, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(mlp(x) @ u, torch.einsum("ni,ij,nj->n", x, Q, x), rtol=1e-10, atol=1e-10)
    contracted = torch.einsum("aij,a->ij", slow_tensor(mlp), u)
    torch.testing.assert_close(Q, (contracted + contracted.T) / 2, rtol=1e-10, atol=1e-10)


def test_biases_by_augmented_input():
    """With biases, MLP(x)[a] = [x,1]^T B_aug[a] [x,1] + b_out[a]."""
    mlp = random_bilinear(bias=True)
    W, V, P, b_out = augmented(mlp)
    B = torch.einsum("ah,hi,hj->aij", P, W, V)
    x = torch.randn(8, D_MODEL, dtype=torch.float64)
    x1 = torch.cat([x, torch.ones(8, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(mlp(x), torch.einsum("aij,ni,nj->na", B, x1, x1) + b_out, rtol=1e-10, atol=1e-10)


def test_hooks_fire_with_names_and_shapes():
    mlp = random_bilinear(bias=False)
    seen = {}
    for name in ("hook_in", "hook_pre", "hook_pre_linear", "hook_post", "hook_out"):
        getattr(mlp, name).add_hook(lambda t, hook, name=name: seen.__setitem__(name, t.shape))
    mlp(torch.randn(2, 3, D_MODEL, dtype=torch.float64))
    assert seen == {
        "hook_in": (2, 3, D_MODEL),
        "hook_pre": (2, 3, D_MLP),
        "hook_pre_linear": (2, 3, D_MLP),
        "hook_post": (2, 3, D_MLP),
        "hook_out": (2, 3, D_MODEL),
    }
    for name in seen:
        getattr(mlp, name).remove_hooks()


def test_hook_pre_is_gate_and_post_is_product():
    mlp = random_bilinear(bias=False)
    cache = {}
    for name in ("hook_pre", "hook_pre_linear", "hook_post"):
        getattr(mlp, name).add_hook(lambda t, hook, name=name: cache.__setitem__(name, t))
    x = torch.randn(5, D_MODEL, dtype=torch.float64)
    mlp(x)
    torch.testing.assert_close(cache["hook_pre"], x @ mlp.W_gate)
    torch.testing.assert_close(cache["hook_pre_linear"], x @ mlp.W_in)
    torch.testing.assert_close(cache["hook_post"], cache["hook_pre"] * cache["hook_pre_linear"])


@pytest.mark.parametrize("kind, act", [("relu", torch.relu), ("gelu", torch.nn.functional.gelu), ("linear", lambda t: t)])
def test_plain_mlps(kind, act):
    torch.manual_seed(1)
    mlp = make_mlp(kind, D_MODEL, D_MLP).double()
    assert isinstance(mlp, MLP) and not hasattr(mlp, "hook_pre_linear")
    x = torch.randn(4, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), act(x @ mlp.W_in) @ mlp.W_out)


def test_swiglu():
    torch.manual_seed(2)
    mlp = make_mlp("swiglu", D_MODEL, D_MLP).double()
    assert isinstance(mlp, GatedMLP) and not isinstance(mlp, BilinearMLP)
    x = torch.randn(4, D_MODEL, dtype=torch.float64)
    expected = (torch.nn.functional.silu(x @ mlp.W_gate) * (x @ mlp.W_in)) @ mlp.W_out
    torch.testing.assert_close(mlp(x), expected)


def test_unknown_kind():
    with pytest.raises(ValueError, match="mlp_kind='tanh' is not an MLP kind; allowed"):
        make_mlp("tanh", 4, 4)


@pytest.mark.parametrize("kind", sorted(MLP_KINDS))
def test_mlp_kind_table_is_what_gets_built(kind):
    """The table's facts are the built module's: gated-ness, activation, hook points, matrices."""
    spec = MLP_KINDS[kind]
    mlp = make_mlp(kind, D_MODEL, D_MLP)
    assert mlp.gated == spec.gated and mlp.act_name == spec.activation
    assert hasattr(mlp, "hook_pre_linear") == spec.gated
    assert sum(p.numel() for p in mlp.parameters()) == spec.n_matrices * D_MODEL * D_MLP
    assert isinstance(mlp, BilinearMLP) == spec.is_bilinear
    assert ModelConfig(d_model=D_MODEL, n_heads=1, mlp_kind=kind).gated == spec.gated
