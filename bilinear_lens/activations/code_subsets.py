"""Measures of spline codes that stay meaningful when every token has its own region.

At realistic width (d_mlp in the thousands) a code has 2^d_mlp possible regions, so on any
text that fits in memory almost every token lands in a region of its own (measured: 18,837
regions for 18,840 tokens at d_mlp 2048) and region counts measure the text's length, not
the layer. Two measures keep their meaning there:

- **Codes on a subset of units.** :func:`choose_units` picks a seeded random subset of ``k``
  units of each layer, :func:`subset_codes` keeps only those units' bits: the region of a
  token is then its cell in the arrangement of those ``k`` hyperplanes (per code factor), at
  most ``2^(k * factors * layers)`` regions, so counts and purity say something again.
- **Hamming neighbourhoods.** :func:`nearest_neighbour_hamming`: for sampled codes, the
  Hamming distance from each to its nearest *other* sampled code, and the fraction within a
  radius ``r``: how close tokens come to sharing a region even when none shares one.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import UInt8
from torch import Tensor

from bilinear_lens.activations.spline_codes import CodeLayout, pack_bits, pairwise_hamming

# Default Hamming radius of a "neighbour", as a fraction of the code's units: 1% of units
# is a small move in code space at any width (20 units of 2048) yet at least one unit.
DEFAULT_RADIUS_FRACTION = 0.01


def choose_units(layers: Sequence[int], d_mlp: int, k: int, seed: int = 0) -> dict[int, np.ndarray]:
    """``k`` distinct units of each layer, sorted (``{layer: int64 [k]}``), drawn uniformly
    without replacement by ``numpy.random.default_rng([seed, layer])`` (so a layer's subset
    does not depend on which other layers are in the code). ``k = d_mlp`` gives all units."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d_mlp:
        raise ValueError(f"units must be an int between 1 and d_mlp={d_mlp}, got {k!r}")
    return {
        int(layer): np.sort(np.random.default_rng([seed, int(layer)]).choice(d_mlp, size=int(k), replace=False))
        for layer in layers
    }


def subset_layout(layout: CodeLayout, units_per_hook: Mapping[str, np.ndarray]) -> CodeLayout:
    """Layout of the code :func:`subset_codes` makes: each hook with its chosen units only."""
    return CodeLayout.from_hooks([(name, len(units_per_hook[name])) for name in layout.hook_names])


def subset_codes(
    packed: UInt8[Tensor, "... n_bytes"], layout: CodeLayout, units_per_hook: Mapping[str, np.ndarray]
) -> UInt8[Tensor, "... n_bytes_subset"]:
    """The code of ``packed`` (laid out by ``layout``) restricted to ``units_per_hook[hook]``
    of each hook, re-packed in :func:`subset_layout` (hooks in order, each byte-aligned)."""
    parts = []
    for name in layout.hook_names:
        bits = layout.unpack_segment(torch.as_tensor(np.asarray(packed)), name)
        index = torch.as_tensor(np.asarray(units_per_hook[name], dtype=np.int64))
        parts.append(pack_bits(bits[..., index]))
    return torch.cat(parts, dim=-1)


def default_radius(n_units: int) -> int:
    """:data:`DEFAULT_RADIUS_FRACTION` of ``n_units``, rounded, at least 1."""
    return max(1, round(n_units * DEFAULT_RADIUS_FRACTION))


def nearest_neighbour_hamming(codes: UInt8[Tensor, "n n_bytes"], radius: int, n_units: int) -> dict[str, float]:
    """Hamming distance from each of ``n`` codes to the nearest of the other ``n - 1``.

    Returns ``n_sampled``, ``radius``, ``mean`` and ``median`` nearest distance (in units),
    ``mean_fraction`` (the mean over ``n_units``), ``within_radius`` (fraction of codes with
    another code at distance ``<= radius``; distance 0: the same region) and ``same_region``
    (fraction with another code at distance 0). NaN statistics for fewer than 2 codes.
    Cost: ``n^2`` XOR-popcounts (1024 codes of 2048 units: about a million 256-byte rows).
    """
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius must be an int >= 0, got {radius!r}")
    array = np.asarray(codes)
    n = int(array.shape[0])
    out: dict[str, float] = {"n_sampled": n, "radius": int(radius)}
    if n < 2:
        return {**out, "mean": float("nan"), "median": float("nan"), "mean_fraction": float("nan"),
                "within_radius": float("nan"), "same_region": float("nan")}
    distances = pairwise_hamming(torch.as_tensor(array)).numpy()
    np.fill_diagonal(distances, np.iinfo(np.int64).max)  # a code is not its own neighbour
    nearest = distances.min(axis=1)
    return {
        **out,
        "mean": float(nearest.mean()),
        "median": float(np.median(nearest)),
        "mean_fraction": float(nearest.mean() / n_units) if n_units else float("nan"),
        "within_radius": float((nearest <= radius).mean()),
        "same_region": float((nearest == 0).mean()),
    }


__all__ = [
    "DEFAULT_RADIUS_FRACTION",
    "choose_units",
    "default_radius",
    "nearest_neighbour_hamming",
    "subset_codes",
    "subset_layout",
]
