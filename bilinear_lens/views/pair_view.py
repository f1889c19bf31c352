"""Pair-matrix heatmaps: offline HTML (inline SVG, no script or link) and a matplotlib figure.

:func:`pair_matrix_html` draws any symmetric writer-pair matrix (a
:class:`~bilinear_lens.circuits.pairs.PairDecomposition`, or labels plus a matrix):
cell colour is the sign (red positive, blue negative), its intensity ``|M| / max|M|``; every
cell carries its value in an SVG ``<title>`` (hover), and a side bar shows each writer's
share (row sum). Nothing is fetched: the markup works in Jupyter, in the HTML report and
from a file opened offline.
"""

from __future__ import annotations

import html
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

CELL = 18  # px per matrix cell
LABEL_W = 90  # px for row labels
BAR_W = 80  # px for the share bars


def diverging_colour(value: float, vmax: float) -> str:
    """``rgb(...)``: white at 0, red for positive, blue for negative, full at ``|value| = vmax``."""
    t = 0.0 if vmax <= 0 else max(-1.0, min(1.0, value / vmax))
    a = abs(t)
    if t >= 0:
        r, g, b = 255, round(255 * (1 - 0.8 * a)), round(255 * (1 - 0.85 * a))
    else:
        r, g, b = round(255 * (1 - 0.85 * a)), round(255 * (1 - 0.6 * a)), 255
    return f"rgb({r},{g},{b})"


def _parts(pairs: Any, labels: Optional[Sequence[str]], matrix: Optional[Tensor]) -> tuple[list[str], Tensor, str]:
    if pairs is not None:
        title = f"layer {pairs.layer} MLP along {pairs.direction_label} at position {pairs.position}"
        if getattr(pairs, "token_strs", None):
            title += f" ({pairs.token_strs[pairs.position]!r})"
        title += f": total {pairs.total:+.4g} (observed {pairs.observed:+.4g})"
        if pairs.scale is not None:
            title += f", ln2 scale frozen at {pairs.scale:.4g}"
        return list(pairs.labels), pairs.matrix.detach().double().cpu(), title
    if labels is None or matrix is None:
        raise ValueError("pass a PairDecomposition, or both labels and matrix")
    matrix = torch.as_tensor(matrix).detach().double().cpu()
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(labels):
        raise ValueError(f"matrix must be [n, n] for n={len(labels)} labels, got shape {tuple(matrix.shape)}")
    return list(labels), matrix, ""


def pair_matrix_html(
    pairs: Any = None, labels: Optional[Sequence[str]] = None, matrix: Optional[Tensor] = None, title: Optional[str] = None
) -> str:
    """A self-contained ``<div>`` with the pair matrix as an inline SVG heatmap and the
    writers' shares (row sums) as bars; see the module docstring."""
    names, M, default_title = _parts(pairs, labels, matrix)
    title = default_title if title is None else title
    n = len(names)
    vmax = float(M.abs().max()) if n else 0.0
    shares = M.sum(1) if n else M.new_zeros(0)
    smax = float(shares.abs().max()) if n else 0.0
    top = LABEL_W  # column labels are drawn rotated above the grid
    width, height = LABEL_W + n * CELL + 10 + BAR_W * 2, top + n * CELL + 10
    out = [f'<svg width="{width}" height="{height}" '
           f'font-family="monospace" font-size="10">']
    for j, name in enumerate(names):
        x = LABEL_W + j * CELL + CELL / 2
        out.append(f'<text transform="translate({x:.1f},{top - 4}) rotate(-60)">{html.escape(name)}</text>')
    for i, name in enumerate(names):
        y = top + i * CELL
        out.append(f'<text x="{LABEL_W - 4}" y="{y + CELL * 0.7:.1f}" text-anchor="end">{html.escape(name)}</text>')
        for j in range(n):
            v = float(M[i, j])
            out.append(f'<rect x="{LABEL_W + j * CELL}" y="{y}" width="{CELL}" height="{CELL}" '
                       f'fill="{diverging_colour(v, vmax)}" stroke="#eee">'
                       f'<title>{html.escape(names[i])} x {html.escape(names[j])}: {v:+.6g}</title></rect>')
        s = float(shares[i])
        bar = 0.0 if smax <= 0 else abs(s) / smax * BAR_W
        x0 = LABEL_W + n * CELL + 10 + BAR_W
        out.append(f'<rect x="{x0 - bar if s < 0 else x0:.1f}" y="{y + 3}" width="{bar:.1f}" height="{CELL - 6}" '
                   f'fill="{diverging_colour(s, smax)}" stroke="#999"><title>share of {html.escape(name)}: {s:+.6g}'
                   f'</title></rect>')
    out.append("</svg>")
    caption = ("cell (c, d): x_c^T Q(u) x_d; bars: shares (row sums). Exact for the observed forward with the norm "
               "scale frozen; the symmetric split is a convention, the pair matrix is not.")
    return (f'<div class="bilinear-lens-pairs"><div style="font-weight:bold">{html.escape(title)}</div>'
            + "".join(out) + f'<div style="font-size:smaller">{html.escape(caption)}</div></div>')


def pair_matrix_figure(pairs: Any = None, labels: Optional[Sequence[str]] = None, matrix: Optional[Tensor] = None) -> Any:
    """The same heatmap as a matplotlib ``Figure`` (symmetric colour scale, ``RdBu_r``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names, M, title = _parts(pairs, labels, matrix)
    vmax = float(M.abs().max()) or 1.0
    size = max(4.0, 0.3 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(M.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_title(title, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig
