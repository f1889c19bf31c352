"""An offline HTML heatmap of a patching grid (or attribution scores): no script, no link.

``PatchingHeatmap(values, axis_names)`` lays a grid ``[*axes]`` out as a table whose
columns are the position axis (``pos``/``dest_pos``, else the last axis) and whose rows
are every combination of the other axes (``layer 0 head 2``...). Cells are coloured by
sign and magnitude (blue positive, red negative, white zero, scaled by the largest
``|value|``) and carry their value as a tooltip. ``_repr_html_`` shows it in Jupyter;
:meth:`PatchingHeatmap.to_html` is a self-contained page or a fragment for the report.
"""

from __future__ import annotations

import html
import itertools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

POSITION_AXES = ("pos", "dest_pos")


def _colour(value: float, scale: float) -> str:
    """``rgb`` from white (0) to blue (+scale) or red (-scale)."""
    t = 0.0 if scale == 0 or not np.isfinite(value) else min(1.0, abs(value) / scale)
    fade = int(round(255 * (1 - t)))
    return f"rgb({fade},{fade},255)" if value >= 0 else f"rgb(255,{fade},{fade})"


@dataclass
class PatchingHeatmap:
    """A heatmap of ``values`` (array-like ``[*axes]``, one axis per name in ``axis_names``).

    ``column_labels``: labels of the position axis (e.g. the prompt's tokens); ``title``:
    a caption.
    """

    values: Any
    axis_names: Sequence[str]
    title: str = "activation patching"
    column_labels: Optional[Sequence[str]] = None
    _grid: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        values = self.values.detach().cpu() if hasattr(self.values, "detach") else self.values  # a torch tensor
        grid = np.asarray(values, dtype=float)
        if grid.ndim != len(self.axis_names) or grid.ndim == 0:
            raise ValueError(f"values has {grid.ndim} axes but axis_names names {len(self.axis_names)}: {list(self.axis_names)}")
        self._grid = grid
        n_cols = grid.shape[self._column_axis()]
        if self.column_labels is not None and len(self.column_labels) != n_cols:
            raise ValueError(f"column_labels has {len(self.column_labels)} labels for {n_cols} columns")

    def _column_axis(self) -> int:
        for name in POSITION_AXES:
            if name in self.axis_names:
                return list(self.axis_names).index(name)
        return len(self.axis_names) - 1

    def rows(self) -> tuple[list[str], np.ndarray]:
        """Row labels and the ``[rows, columns]`` matrix the table shows."""
        col = self._column_axis()
        other = [i for i in range(self._grid.ndim) if i != col]
        matrix = np.moveaxis(self._grid, col, -1).reshape(-1, self._grid.shape[col])
        labels = [" ".join(f"{self.axis_names[i]} {v}" for i, v in zip(other, combo)) or "all"
                  for combo in itertools.product(*(range(self._grid.shape[i]) for i in other))]
        return labels, matrix

    def to_html(self, full_page: bool = False) -> str:
        labels, matrix = self.rows()
        finite = np.abs(matrix[np.isfinite(matrix)])
        scale = float(finite.max()) if finite.size else 0.0
        col_name = self.axis_names[self._column_axis()]
        heads = self.column_labels or [str(i) for i in range(matrix.shape[1])]
        out = ['<table class="bl-patching" style="border-collapse:collapse;font:11px monospace">',
               f'<caption style="text-align:left;font-weight:bold">{html.escape(self.title)} '
               f'(max |value| {scale:.4g})</caption>',
               f'<tr><th>{html.escape(col_name)}</th>'
               + "".join(f'<th style="padding:2px 4px">{html.escape(str(h))}</th>' for h in heads) + "</tr>"]
        for label, row in zip(labels, matrix):
            cells = "".join(
                f'<td title="{html.escape(label)}, {html.escape(col_name)} {j}: {v:.6g}" '
                f'style="background:{_colour(v, scale)};min-width:24px;height:16px;text-align:center">{v:.2g}</td>'
                for j, v in enumerate(row))
            out.append(f'<tr><th style="text-align:right;padding-right:4px">{html.escape(label)}</th>{cells}</tr>')
        out.append("</table>")
        fragment = "\n".join(out)
        if not full_page:
            return fragment
        return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(self.title)}</title></head>'
                f"<body>{fragment}</body></html>\n")

    def _repr_html_(self) -> str:
        return self.to_html()
