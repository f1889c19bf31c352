"""Figures and an HTML report of an image classifier's weight readings.

- :func:`plot_class_eigenvectors`: one class's top positive (first row) and most negative
  (second row) eigenvectors as images, titled with their eigenvalues (the paper's Fig. 3);
- :func:`plot_eigen_grid`: the top positive / negative eigenvector of every class;
- :func:`plot_class_spectra`: every class's eigenvalues, sorted;
- :func:`image_report` / :func:`write_image_report`: a self-contained HTML page (PNG figures
  inlined as base64, no network) with accuracy, the eigenvector grids, spectra, low-rank
  accuracy and the adversarial-mask comparison.

Images use a diverging colormap centred on 0 (red positive, blue negative pixels), scaled
per image to its largest ``|value|``: an eigenvector's sign is arbitrary, its pattern is not.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.figure import Figure

from bilinear_lens.files.atomic import atomic_write_text
from bilinear_lens.models.image_classifier import ImageClassifier
from bilinear_lens.views.plots import _new_figure, figure_to_html
from bilinear_lens.weights.image_eigen import ClassEigen, class_eigendecomposition, low_rank_accuracy

CMAP = "RdBu_r"


def _show(ax: Any, image: np.ndarray, title: str) -> None:
    scale = float(np.abs(image).max()) or 1.0
    ax.imshow(image, cmap=CMAP, vmin=-scale, vmax=scale)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _class_name(class_names: Optional[Sequence[str]], cls: int) -> str:
    return str(class_names[cls]) if class_names is not None else str(cls)


def plot_class_eigenvectors(eig: ClassEigen, cls: int, top: int = 4, class_names: Optional[Sequence[str]] = None) -> Figure:
    """Class ``cls``'s ``top`` largest-positive (row 1) and most negative (row 2) eigenvectors."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}")
    fig = _new_figure((1.4 * top, 3.2))
    axes = fig.subplots(2, top, squeeze=False)
    for row, which in enumerate(("positive", "negative")):
        images, values = eig.images(cls, which, top)
        for j in range(top):
            ax = axes[row][j]
            if j < len(values):
                _show(ax, images[j].cpu().numpy(), f"λ={float(values[j]):.3g}")
            else:
                ax.axis("off")
    fig.suptitle(f"class {_class_name(class_names, cls)}: top positive / negative eigenvectors", fontsize=9)
    return fig


def plot_eigen_grid(eig: ClassEigen, class_names: Optional[Sequence[str]] = None) -> Figure:
    """Two rows per figure: each class's top positive and most negative eigenvector."""
    n = eig.eigenvalues.shape[0]
    fig = _new_figure((1.2 * n, 3.0))
    axes = fig.subplots(2, n, squeeze=False)
    for cls in range(n):
        for row, which in enumerate(("positive", "negative")):
            images, values = eig.images(cls, which, 1)
            _show(axes[row][cls], images[0].cpu().numpy(), f"{_class_name(class_names, cls)}: λ={float(values[0]):.2g}")
    fig.suptitle("top positive (row 1) and negative (row 2) eigenvector of each class", fontsize=9)
    return fig


def plot_class_spectra(eig: ClassEigen, class_names: Optional[Sequence[str]] = None, top: int = 30) -> Figure:
    """Each class's eigenvalues in decreasing order (the ``top`` largest and ``top`` most
    negative), one line per class."""
    fig = _new_figure((6.0, 3.2))
    ax = fig.add_subplot()
    for cls in range(eig.eigenvalues.shape[0]):
        vals = eig.eigenvalues[cls].sort(descending=True).values.cpu().numpy()
        vals = np.concatenate([vals[:top], vals[-top:]]) if len(vals) > 2 * top else vals
        ax.plot(vals, marker=".", lw=1, label=_class_name(class_names, cls))
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("eigenvalue index (sorted, largest first)")
    ax.set_ylabel("eigenvalue")
    ax.set_title("per-class spectra of Q(u_c)")
    ax.legend(fontsize=6, ncol=2)
    return fig


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="bl-table"><tr>{head}</tr>{body}</table>'


@torch.no_grad()
def image_report(
    model: ImageClassifier, test_x: Optional[torch.Tensor] = None, test_y: Optional[torch.Tensor] = None,
    class_names: Optional[Sequence[str]] = None, top: int = 4, ks: Sequence[int] = (1, 2, 4, 8),
    epsilons: Sequence[float] = (0.5, 1.0, 2.0), title: str = "bilinear-lens image classifier report",
) -> str:
    """The HTML page (module docstring). With ``test_x`` / ``test_y`` it adds the accuracy,
    the low-rank accuracy table and the adversarial-mask comparison."""
    from bilinear_lens.views.viz import html_page
    from bilinear_lens.weights.adversarial_masks import compare_attacks

    eig = class_eigendecomposition(model)
    cfg = model.cfg
    sections: list[Any] = [
        "<h2>model</h2>" + _table([[cfg.mlp_kind, cfg.n_layers, f"{cfg.image_shape[0]}x{cfg.image_shape[1]}",
                                    cfg.d_embed or "none", cfg.d_mlp, cfg.residual]],
                                   ["mlp_kind", "layers", "image", "d_embed", "d_mlp", "residual"]),
    ]
    if test_x is not None and test_y is not None:
        full = model.accuracy(test_x, test_y)
        d = eig.eigenvalues.shape[-1]
        low = low_rank_accuracy(model, test_x, test_y, [k for k in ks if k <= d], eig)
        sections.append("<h2>held-out accuracy</h2>" + _table(
            [["full model", f"{full:.4f}"]] + [[f"top-{k} eigenvectors per class", f"{a:.4f}"] for k, a in low.items()],
            ["logits", "accuracy"]))
    sections.append("<h2>eigenvectors</h2>")
    sections.append(figure_to_html(plot_eigen_grid(eig, class_names), alt="eigenvector grid"))
    for cls in range(eig.eigenvalues.shape[0]):
        sections.append(figure_to_html(plot_class_eigenvectors(eig, cls, top, class_names),
                                       alt=f"eigenvectors of class {_class_name(class_names, cls)}"))
    sections.append("<h2>spectra</h2>")
    sections.append(figure_to_html(plot_class_spectra(eig, class_names), alt="per-class spectra"))
    if test_x is not None and test_y is not None:
        rows = compare_attacks(model, test_x, test_y, epsilons)
        sections.append("<h2>adversarial masks (flip rate of correctly classified test images)</h2>" + _table(
            [[r["eps"], f"{r['eigen']:.3f}", f"{r['gradient']:.3f}", f"{r['random']:.3f}"] for r in rows],
            ["L2 norm", "eigenvector mask", "gradient (FGM)", "random"]))
    style = ("<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
             ".bl-table{border-collapse:collapse}.bl-table td,.bl-table th{border:1px solid #ccc;padding:2px 6px}</style>")
    return html_page(sections, title=title).replace("</head>", style + "\n</head>", 1)


def write_image_report(model: ImageClassifier, path: Union[str, Path], **kwargs: Any) -> Path:
    """Write :func:`image_report` to ``path`` atomically; returns the path."""
    return atomic_write_text(Path(path), image_report(model, **kwargs))


__all__ = ["image_report", "plot_class_eigenvectors", "plot_class_spectra", "plot_eigen_grid", "write_image_report"]
