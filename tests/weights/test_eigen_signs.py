"""The eigenvector sign convention (largest-|entry| component positive, lowest index on a
tie): every solver path, dtype and the atlas return the same vectors, not ``v`` or ``-v``."""

from __future__ import annotations

import json
from typing import Callable

import pytest
import torch

from bilinear_lens.weights import batched_eigen
from bilinear_lens.weights.atlas import build_atlas
from bilinear_lens.files.serialized import read_tensors
from bilinear_lens.weights.atlas_store import SHARD_RECORD, SHARD_TENSORS, EigenAtlas, ShardSpec, write_shard
from bilinear_lens.weights.batched_eigen import batched_top_eigenpairs
from bilinear_lens.weights.eigen import (
    Eigendecomposition,
    canonical_signs,
    default_tol,
    eigendecompose,
    eigendecompose_directions,
    top_eigenvectors,
)
from bilinear_lens.weights.tensor import BilinearWeights, interaction_matrices

# d 96: large enough that batched_top_eigenpairs (block 12, 8 * 12 <= 96) and the atlas take
# the Krylov path, not their exact-eigh shortcut.
D, D_MLP, K, N_DIRS = 96, 160, 4, 4


def case() -> tuple[BilinearWeights, torch.Tensor]:
    """Random float64 weights and directions. Seed 0 is chosen so every top-K reference vector's
    largest |entry| beats the runner-up by > 2x the float32 error bound below (asserted in
    :func:`reference`): the convention must then pick the same sign in every precision."""
    g = torch.Generator().manual_seed(0)
    w = BilinearWeights(*(torch.randn(*s, generator=g, dtype=torch.float64) / s[0] ** 0.5 for s in ((D, D_MLP), (D, D_MLP), (D_MLP, D))))
    return w, torch.randn(N_DIRS, D, dtype=torch.float64, generator=g)


def pivot_is_positive(V: torch.Tensor) -> bool:
    """The convention: ``V[j*, i] > 0`` for ``j* = argmax_j |V[j, i]|`` (first maximum), every column."""
    return bool((V.gather(-2, V.abs().argmax(-2, keepdim=True)) > 0).all())


def reference(dtype: torch.dtype) -> tuple[Eigendecomposition, torch.Tensor]:
    """float64 ``eigh`` top-K of ``Q(U[n])`` and, per pair, the error bound of a ``dtype`` solve.

    Bound (Davis-Kahan): a unit vector with residual ``||Q v - lambda v|| <= r max|lambda|``
    is within angle ``r max|lambda| / gap`` of the eigenvector, ``gap`` the distance to the
    nearest other eigenvalue. Every solver here guarantees ``r <= 10 tol`` (check_converged;
    ``eigh``'s backward error ``~ d eps`` is below ``tol``), with ``tol`` = default_tol: 1e-10
    in float64, 1e-5 in float32 (float32 eigh: 96 * 6e-8 ~ 6e-6). Measured worst errors were
    ~30x (float32) and ~2000x (float64) below this bound.
    """
    w, U = case()
    full = eigendecompose(interaction_matrices(w, U))
    lam = full.eigenvalues
    top = lam[:, :K]
    gaps = (top[..., None] - lam[:, None, :]).abs().topk(2, dim=-1, largest=False).values[..., 1]  # [0] is itself
    bound = 10 * default_tol(dtype) * lam.abs().amax(-1, keepdim=True) / gaps
    ref = full.top(K)
    ranked = ref.eigenvectors.abs().sort(-2, descending=True).values
    assert (ranked[:, 0] - ranked[:, 1] > 2 * bound).all(), "the pivot entry is not decidable at this precision"
    return ref, bound


def per_direction(solve: Callable[[BilinearWeights, torch.Tensor], Eigendecomposition]) -> Callable:
    return lambda w, U: Eigendecomposition(*(torch.stack(t) for t in zip(*(solve(w, u) for u in U))))


def batched_krylov(w: BilinearWeights, U: torch.Tensor) -> Eigendecomposition:
    got = batched_top_eigenpairs(interaction_matrices(w, U), K, block_size=8, steps=3, adaptive_exact=False,
                                 generator=torch.Generator().manual_seed(1))
    assert got.exact_rows == 0  # the Krylov path, whose Ritz vectors are formed after the sort
    return got.eig


PATHS = {
    "eigh": lambda w, U: eigendecompose(interaction_matrices(w, U)).top(K),
    "dense": per_direction(lambda w, u: top_eigenvectors(w, u, K, method="dense")),
    "lanczos": per_direction(lambda w, u: top_eigenvectors(w, u, K, method="lanczos")),
    "block": per_direction(lambda w, u: top_eigenvectors(w, u, K, method="block")),
    "block_seed_7": per_direction(lambda w, u: top_eigenvectors(w, u, K, method="block", seed=7)),
    "batched_krylov": batched_krylov,
    "eigendecompose_directions": lambda w, U: eigendecompose_directions(w, U, k=K, chunk_size=3),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("path", list(PATHS))
def test_every_path_and_dtype_returns_the_same_signed_vectors(path: str, dtype: torch.dtype) -> None:
    ref, bound = reference(dtype)
    w, U = case()
    got = PATHS[path](w.to(None, dtype), U.to(dtype))
    assert got.eigenvectors.dtype == dtype and got.eigenvectors.shape == (N_DIRS, D, K)
    assert pivot_is_positive(got.eigenvectors)
    # signed comparison: a flipped vector would be off by ~2 max|v| >> bound
    error = (got.eigenvectors.double() - ref.eigenvectors).abs().amax(-2)
    assert (error <= bound).all(), (error / bound).max()
    assert ((got.eigenvectors.double() * ref.eigenvectors).sum(-2) > 0.99).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("route", ["dense_b", "factored"])
def test_atlas_vectors_equal_eigendecompose_directions(tmp_path, monkeypatch, route: str, dtype: torch.dtype) -> None:
    ref, bound = reference(dtype)
    w, U = case()
    expected = eigendecompose_directions(w.to(None, dtype), U.to(dtype), k=K)
    # keep every matrix on the Krylov path (at these tolerances the adaptive switch would send
    # most of them to the exact eigh, whose vectors are canonical already)
    monkeypatch.setattr(batched_eigen, "_exact_is_cheaper", lambda residual, *args: torch.zeros_like(residual, dtype=torch.bool))
    atlas = build_atlas({0: w}, U, tmp_path / "a", k=K, shard_size=3, route=route, dtype=dtype,
                        tol=default_tol(dtype), progress=False)
    assert all(json.loads(f.read_text())["exact_rows"] == 0 for f in (tmp_path / "a").glob(f"*/{SHARD_RECORD}"))
    vectors = atlas.layer_tensors(0, "eigenvectors")
    stored = [read_tensors(f, what="atlas shard")["eigenvectors"] for f in sorted((tmp_path / "a").glob(f"*/{SHARD_TENSORS}"))]
    assert torch.equal(torch.cat(stored), vectors)  # written with the convention, not fixed on read only
    assert pivot_is_positive(vectors)
    # both within the Davis-Kahan bound of the float64 reference (see reference), so of each other
    # within twice it; the atlas stores pairs to tol (here default_tol) like the other solvers
    error = (vectors.double() - expected.eigenvectors.double()).abs().amax(-2)
    assert (error <= 2 * bound).all(), (error / bound).max()


def test_atlas_written_before_the_convention_reads_with_it(tmp_path) -> None:
    """An atlas whose shards hold arbitrary signs (as written before the convention) loads
    with the convention: the loader re-applies it, so old and new atlases read the same."""
    w, U = case()
    atlas = build_atlas({0: w}, U, tmp_path / "a", k=K, shard_size=3, dtype=torch.float64, tol=1e-10, progress=False)
    expected = atlas.layer_tensors(0, "eigenvectors")
    spec = ShardSpec(0, 0, 3)
    tensors = read_tensors(tmp_path / "a" / spec.name / SHARD_TENSORS, what="atlas shard")
    tensors["eigenvectors"] = tensors["eigenvectors"] * torch.tensor([-1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    for f in (tmp_path / "a" / spec.name).iterdir():
        f.unlink()
    (tmp_path / "a" / spec.name).rmdir()
    write_shard(tmp_path / "a", spec, tensors, atlas.index["fingerprint"], exact_rows=0)  # a valid shard, other signs
    assert torch.equal(EigenAtlas(tmp_path / "a").layer_tensors(0, "eigenvectors"), expected)


def test_canonical_signs_convention() -> None:
    V = torch.randn(5, 7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    C = canonical_signs(V)
    assert torch.equal(C.abs(), V.abs())  # whole columns flip, nothing else changes
    assert ((C == V).all(-2) | (C == -V).all(-2)).all()
    assert pivot_is_positive(C)
    assert torch.equal(canonical_signs(-V), C) and torch.equal(canonical_signs(C), C)  # sign-blind, idempotent
    # exact tie of |entries| 0 and 1: the lower index decides; a zero column stays zero
    tie = torch.tensor([[-0.6, 0.6, 0.0], [0.6, -0.6, 0.0], [0.1, 0.2, 0.0]])
    assert torch.equal(canonical_signs(tie), torch.tensor([[0.6, 0.6, 0.0], [-0.6, -0.6, 0.0], [-0.1, 0.2, 0.0]]))
    assert canonical_signs(torch.empty(2, 0, 0)).shape == (2, 0, 0)


def test_sign_flipped_input_to_the_sort_is_undone() -> None:
    """eigh's own signs do not leak: flipping the columns before the sort changes nothing."""
    from bilinear_lens.weights.eigen import sort_by_magnitude

    w, U = case()
    values, vectors = torch.linalg.eigh(interaction_matrices(w, U[:1]))
    flips = torch.where(torch.arange(D) % 2 == 0, -1.0, 1.0).double()
    a, b = sort_by_magnitude(values, vectors), sort_by_magnitude(values, vectors * flips)
    assert torch.equal(a.eigenvectors, b.eigenvectors) and torch.equal(a.eigenvalues, b.eigenvalues)
