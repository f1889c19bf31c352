"""The packed symmetric tensor: tile layout, equality with the factored Q(u), bias corner, errors."""

from __future__ import annotations

import pytest
import torch

from bilinear_lens.weights.packed_tensor import PackedSymmetricTensor, packed_size, tile_pairs
from bilinear_lens.weights.tensor import BilinearWeights, bilinear_output, augment_input, interaction_matrices


def weights(d: int, d_mlp: int, seed: int = 0, bias: bool = False) -> BilinearWeights:
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(*s, generator=g, dtype=torch.float64) / s[0] ** 0.5 for s in ((d, d_mlp), (d, d_mlp), (d_mlp, d))]
    biases = [torch.randn(n, generator=g, dtype=torch.float64) for n in (d_mlp, d_mlp, d)] if bias else []
    return BilinearWeights(*mats, *biases)


@pytest.mark.parametrize("d,tile", [(23, 8), (24, 8), (5, 64), (7, 1)])
def test_tile_pairs_cover_the_upper_triangle_once(d: int, tile: int) -> None:
    count = torch.zeros(d, d, dtype=torch.int64)
    offset = 0
    for p in tile_pairs(d, tile):
        assert p.offset == offset and p.rows.start <= p.cols.start  # contiguous, upper blocks only
        count[p.rows, p.cols] += 1
        if p.rows != p.cols:  # an off-diagonal tile also fills its mirror image
            count[p.cols, p.rows] += 1
        offset += p.size
    assert torch.equal(count, torch.ones(d, d, dtype=torch.int64))


def test_stored_fraction_is_about_half() -> None:
    assert packed_size(512, 32) == 136 * 32 * 32  # 16 tiles: 16 * 17 / 2 pairs of 32 x 32, 53% of 512^2


@pytest.mark.parametrize("d,tile", [(23, 8), (16, 64), (12, 5)])
def test_contract_equals_factored_interaction_matrices(d: int, tile: int) -> None:
    w = weights(d, 3 * d)
    U = torch.randn(9, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = PackedSymmetricTensor.build(w, tile=tile).contract(U)
    # float64 sums of 3d products of O(1) terms: 1e-12 is ~1e4 ulps of headroom
    torch.testing.assert_close(got, interaction_matrices(w, U), rtol=0, atol=1e-12)
    assert torch.equal(got, got.mT)  # exactly symmetric: the mirror is a copy


def test_bias_corner_reproduces_the_mlp_on_augmented_inputs() -> None:
    w = weights(10, 30, seed=2, bias=True)
    U = torch.randn(4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    Q = PackedSymmetricTensor.build(w, include_bias=True, tile=4).contract(U)
    torch.testing.assert_close(Q, interaction_matrices(w, U, include_bias=True), rtol=0, atol=1e-12)
    x = augment_input(torch.randn(6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    quadratic = torch.einsum("bi,nij,bj->bn", x, Q, x)
    torch.testing.assert_close(quadratic, bilinear_output(w, x[:, :-1]) @ U.T, rtol=0, atol=1e-11)


def test_errors_name_the_shape() -> None:
    B = PackedSymmetricTensor.build(weights(6, 12), tile=4)
    with pytest.raises(ValueError, match=r"U must be \[n_dirs, 6\], got shape \(3, 5\)"):
        B.contract(torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="tile must be >= 1, got 0"):
        tile_pairs(6, 0)
    with pytest.raises(ValueError, match=r"packed must be \[d_out, 28\]"):  # tiles 4 + 2: 16 + 8 + 4
        PackedSymmetricTensor(torch.zeros(6, 35), d=6, tile=4)
