"""matplotlib figures for bilinear-layer analyses: spectra, interaction heat maps, rank-k
fits, ablation effects and polytope boundary density, plus PNG / HTML embedding.

Every function returns a ``matplotlib.figure.Figure`` built with the object-oriented API
(never ``pyplot``): nothing is shown or kept in pyplot's global figure list and no
backend is chosen, so it is headless-safe. A bare ``Figure`` has no notebook
representation unless pyplot's inline backend registered one, so the figures here are a
``Figure`` subclass with ``_repr_png_``: a returned figure displays exactly once in
Jupyter. Functions that draw a single panel take ``ax=`` to draw into an existing axes
instead (the axes' figure is returned).
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from torch import Tensor

ArrayLike = Union[Tensor, np.ndarray, Sequence[float]]

POSITIVE_COLOR = "#2166ac"  # blue, matches RdBu_r's positive end
NEGATIVE_COLOR = "#b2182b"  # red

__all__ = [
    "figure_to_base64_png",
    "figure_to_html",
    "plot_ablation_effects",
    "plot_boundary_density",
    "plot_eigenvalue_spectrum",
    "plot_interaction_heatmap",
    "plot_rank_k_curve",
    "plot_rank_k_scatter",
]


def as_array(x: Any, name: str) -> np.ndarray:
    """float64 numpy copy of a tensor / array / list."""
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a tensor, array or list of numbers, got {type(x).__name__}") from err


def _vector(x: Any, name: str) -> np.ndarray:
    arr = as_array(x, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    return arr


class DisplayFigure(Figure):
    """A ``Figure`` that Jupyter renders as PNG even when pyplot was never imported."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


def _new_figure(figsize: tuple[float, float]) -> Figure:
    return DisplayFigure(figsize=figsize, layout="constrained")


def _new_axes(ax: Optional[Axes], figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = _new_figure(figsize)
    return fig, fig.add_subplot()


def _sign_colors(values: np.ndarray) -> list[str]:
    return [POSITIVE_COLOR if v >= 0 else NEGATIVE_COLOR for v in values]


def _sorted_by_magnitude(eigenvalues: Any, name: str, top: Optional[int]) -> np.ndarray:
    """Eigenvalues (tensor, array, or anything with ``.eigenvalues``) sorted by ``|lambda|``."""
    vals = _vector(getattr(eigenvalues, "eigenvalues", eigenvalues), name)
    vals = vals[np.argsort(-np.abs(vals), kind="stable")]
    if top is not None:
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        vals = vals[:top]
    return vals


def plot_eigenvalue_spectrum(
    eigenvalues: Union[ArrayLike, Mapping[str, ArrayLike]],
    title: str = "Eigenvalue spectrum",
    top: Optional[int] = None,
    *,
    ax: Optional[Axes] = None,
    figsize: tuple[float, float] = (7.0, 3.5),
) -> Figure:
    """Eigenvalues of an interaction matrix ``Q(u)`` by rank of ``|lambda|``.

    Args:
        eigenvalues: ``[d]`` for one output direction: bars, blue for positive and red
            for negative. Or a dict ``name -> [d]`` for several directions: one line
            with markers per direction, overlaid.
        title: axes title.
        top: keep only the ``top`` largest-magnitude eigenvalues.
    """
    fig, ax = _new_axes(ax, figsize)
    if isinstance(eigenvalues, Mapping):
        if not eigenvalues:
            raise ValueError("eigenvalues dict is empty")
        for name, vals in eigenvalues.items():
            v = _sorted_by_magnitude(vals, f"eigenvalues[{name!r}]", top)
            ax.plot(np.arange(len(v)), v, marker="o", markersize=3, linewidth=1, label=str(name))
        ax.legend(title="output direction", fontsize="small")
    else:
        v = _sorted_by_magnitude(eigenvalues, "eigenvalues", top)
        ax.bar(np.arange(len(v)), v, color=_sign_colors(v), width=0.8)
        ax.legend(
            handles=[Patch(color=POSITIVE_COLOR, label="λ > 0"), Patch(color=NEGATIVE_COLOR, label="λ < 0")],
            fontsize="small",
        )
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("eigenvalue rank (by |λ|)")
    ax.set_ylabel("λ")
    ax.set_title(title)
    return fig


def plot_interaction_heatmap(
    matrix: ArrayLike,
    row_labels: Sequence[str],
    col_labels: Optional[Sequence[str]] = None,
    title: str = "Interaction matrix",
    *,
    cmap: str = "RdBu_r",
    vmax: Optional[float] = None,
    annotate: bool = False,
    ax: Optional[Axes] = None,
    figsize: Optional[tuple[float, float]] = None,
) -> Figure:
    """Heat map of a ``[n_rows, n_cols]`` (token x token) interaction matrix.

    The diverging colour map is centred at 0 (limits ``±vmax``, default ``max|matrix|``).
    ``col_labels`` defaults to ``row_labels`` (a square sub-matrix such as the
    sentiment / negation block). ``annotate`` writes each value in its cell.
    """
    mat = as_array(matrix, "matrix")
    if mat.ndim != 2:
        raise ValueError(f"matrix must be 2-D [n_rows, n_cols], got shape {tuple(mat.shape)}")
    rows = [str(r) for r in row_labels]
    cols = rows if col_labels is None else [str(c) for c in col_labels]
    if len(rows) != mat.shape[0]:
        raise ValueError(f"matrix has {mat.shape[0]} rows but {len(rows)} row_labels were given")
    if len(cols) != mat.shape[1]:
        raise ValueError(f"matrix has {mat.shape[1]} columns but {len(cols)} col_labels were given")
    if figsize is None:
        figsize = (max(3.5, 0.45 * len(cols) + 2.0), max(3.0, 0.4 * len(rows) + 1.5))
    fig, ax = _new_axes(ax, figsize)
    bound = float(np.nanmax(np.abs(mat))) if vmax is None and np.isfinite(mat).any() else vmax
    bound = bound or 1.0
    image = ax.imshow(mat, cmap=cmap, vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    ax.set_xticks(np.arange(len(cols)), labels=cols, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(np.arange(len(rows)), labels=rows)
    if annotate:
        for (i, j), value in np.ndenumerate(mat):
            color = "white" if abs(value) > 0.6 * bound else "black"
            ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize="x-small", color=color)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_title(title)
    return fig


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def plot_rank_k_scatter(
    true: ArrayLike,
    approx: ArrayLike,
    k: int,
    *,
    title: Optional[str] = None,
    xlabel: str = "true output",
    ylabel: Optional[str] = None,
    ax: Optional[Axes] = None,
    figsize: tuple[float, float] = (4.5, 4.5),
) -> Figure:
    """Scatter of rank-``k`` approximated outputs against the true outputs (same shape,
    flattened to ``n`` points), with the ``y = x`` line and Pearson ``r`` in the title."""
    t, a = as_array(true, "true").reshape(-1), as_array(approx, "approx").reshape(-1)
    if t.shape != a.shape:
        raise ValueError(f"true has {t.size} values but approx has {a.size}; they must match")
    if t.size == 0:
        raise ValueError("true and approx are empty")
    r = _pearson(t, a)
    fig, ax = _new_axes(ax, figsize)
    ax.scatter(t, a, s=6, alpha=0.5, color=POSITIVE_COLOR, linewidths=0)
    lo, hi = float(min(t.min(), a.min())), float(max(t.max(), a.max()))
    ax.plot([lo, hi], [lo, hi], color="gray", linewidth=0.8, linestyle="--", label="y = x")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or f"rank-{k} approximation")
    ax.set_title(title or f"Rank-{k} approximation (r = {r:.3f})")
    ax.legend(fontsize="small", loc="upper left")
    return fig


def plot_rank_k_curve(
    ks: ArrayLike,
    correlations: Union[ArrayLike, Mapping[str, ArrayLike]],
    *,
    title: str = "Rank-k approximation quality",
    ylabel: str = "correlation with true output",
    logx: bool = False,
    ax: Optional[Axes] = None,
    figsize: tuple[float, float] = (5.5, 3.5),
) -> Figure:
    """Correlation against rank ``k``: ``ks`` ``[m]`` and ``correlations`` ``[m]`` (or a
    dict ``name -> [m]``, one line each)."""
    k = _vector(ks, "ks")
    curves = correlations if isinstance(correlations, Mapping) else {"": correlations}
    if not curves:
        raise ValueError("correlations dict is empty")
    fig, ax = _new_axes(ax, figsize)
    for name, corr in curves.items():
        c = _vector(corr, f"correlations[{name!r}]" if name else "correlations")
        if c.shape != k.shape:
            raise ValueError(f"ks has {k.size} entries but {('correlations[' + repr(name) + ']') if name else 'correlations'} has {c.size}")
        ax.plot(k, c, marker="o", markersize=4, label=str(name) or None)
    if isinstance(correlations, Mapping):
        ax.legend(fontsize="small")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel("rank k")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def plot_ablation_effects(
    deltas: ArrayLike,
    labels: Optional[Sequence[str]] = None,
    top: int = 20,
    *,
    title: str = "Largest ablation effects",
    xlabel: str = "Δ loss when ablated",
    ax: Optional[Axes] = None,
    figsize: Optional[tuple[float, float]] = None,
) -> Figure:
    """Horizontal bars of the ``top`` largest ``|delta|`` (e.g. loss change per ablated neuron).

    ``deltas`` is ``[n]`` (labels default to ``"#i"``) or ``[n_layers, n]`` (flattened;
    labels default to ``"L{layer}.{i}"``). Largest effect on top; red for increases of
    the loss (the component helped), blue for decreases.
    """
    arr = as_array(deltas, "deltas")
    if arr.ndim == 2 and labels is None:
        labels = [f"L{l}.{i}" for l in range(arr.shape[0]) for i in range(arr.shape[1])]
    elif arr.ndim not in (1, 2):
        raise ValueError(f"deltas must be [n] or [n_layers, n], got shape {tuple(arr.shape)}")
    flat = arr.reshape(-1)
    if flat.size == 0:
        raise ValueError("deltas is empty")
    names = [f"#{i}" for i in range(flat.size)] if labels is None else [str(x) for x in labels]
    if len(names) != flat.size:
        raise ValueError(f"got {len(names)} labels for {flat.size} deltas")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    order = np.argsort(-np.abs(flat), kind="stable")[:top]
    values = flat[order]
    fig, ax = _new_axes(ax, figsize or (6.0, max(2.5, 0.28 * len(order) + 1.2)))
    colors = [NEGATIVE_COLOR if v > 0 else POSITIVE_COLOR for v in values]
    ax.barh(np.arange(len(order)), values, color=colors)
    ax.set_yticks(np.arange(len(order)), labels=[names[i] for i in order])
    ax.invert_yaxis()  # largest at the top
    ax.axvline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return fig


def plot_boundary_density(
    t: ArrayLike,
    changes: ArrayLike,
    *,
    title: str = "Polytope boundaries along the path",
    xlabel: str = "t along path",
    ylabel: str = "boundaries crossed",
    figsize: tuple[float, float] = (6.5, 4.5),
) -> Figure:
    """Two stacked panels: boundary crossings per step, and their cumulative count.

    ``t`` is ``[m]`` path positions. ``changes`` is ``[m - 1]`` (crossings between
    ``t[i]`` and ``t[i+1]``, drawn as stairs) or ``[m]`` (one value per position).
    """
    tt, ch = _vector(t, "t"), _vector(changes, "changes")
    if ch.size == tt.size - 1:
        per_interval = True
    elif ch.size == tt.size:
        per_interval = False
    else:
        raise ValueError(f"changes has {ch.size} entries but t has {tt.size}; expected {tt.size - 1} (per step) or {tt.size}")
    fig = _new_figure(figsize)
    ax_step, ax_cum = fig.subplots(2, 1, sharex=True)
    if per_interval:
        ax_step.stairs(ch, tt, fill=True, color=POSITIVE_COLOR, alpha=0.8)
        cumulative_t, cumulative = tt, np.concatenate([[0.0], np.cumsum(ch)])
    else:
        ax_step.plot(tt, ch, drawstyle="steps-mid", color=POSITIVE_COLOR)
        cumulative_t, cumulative = tt, np.cumsum(ch)
    ax_cum.plot(cumulative_t, cumulative, color="black")
    ax_step.set_ylabel(f"{ylabel}\nper step")
    ax_cum.set_ylabel(f"cumulative {ylabel}")
    ax_cum.set_xlabel(xlabel)
    ax_step.set_title(title)
    for a in (ax_step, ax_cum):
        a.grid(alpha=0.3)
    return fig


def figure_to_base64_png(fig: Figure, dpi: int = 100) -> str:
    """The figure as a base64-encoded PNG (ASCII string, no ``data:`` prefix)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figure_to_html(fig: Figure, alt: str = "", dpi: int = 100) -> str:
    """``<img src="data:image/png;base64,...">``: the figure embedded in self-contained HTML."""
    return f'<img src="data:image/png;base64,{figure_to_base64_png(fig, dpi)}" alt="{html.escape(alt)}">'
