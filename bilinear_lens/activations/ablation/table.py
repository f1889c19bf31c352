"""The result table of a sweep: one row per neuron, columnar tensors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor


@dataclass(frozen=True)
class NeuronTable:
    """One row per neuron; columnar tensors, tidy rows on demand.

    ``columns["neuron"]`` holds the neuron indices; the other columns are ``float64``
    ``[n_rows]``. ``baseline`` holds the unintervened metric values; ``uncertainty`` how the
    standard errors were clustered (``{"clusters": "documents" | "rows", "n_clusters":
    {metric: G}}``; empty where the table has none).
    """

    layer: int
    hook: str
    method: str
    columns: dict[str, Tensor]
    baseline: dict[str, float] = field(default_factory=dict)
    uncertainty: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.columns["neuron"].shape[0])

    def __getitem__(self, column: str) -> Tensor:
        if column not in self.columns:
            raise KeyError(f"no column {column!r}; columns are {list(self.columns)}")
        return self.columns[column]

    @property
    def value_columns(self) -> list[str]:
        return [name for name in self.columns if name != "neuron"]

    def rows(self) -> list[dict[str, Union[int, float]]]:
        """``[{"neuron": 3, "delta_loss": 0.01, ...}, ...]`` in table order."""
        lists = {name: col.tolist() for name, col in self.columns.items()}
        return [{name: lists[name][i] for name in lists} for i in range(len(self))]

    def sort_by(self, column: Optional[str] = None, by_abs: bool = True, descending: bool = True) -> "NeuronTable":
        """Rows reordered by ``column`` (default: the first value column), by magnitude unless
        ``by_abs=False``. Ties keep neuron order."""
        key = self[column or self.value_columns[0]]
        key = key.abs() if by_abs else key
        # NaN (e.g. normalized effect with clean == corrupted) sorts last either way.
        key = key.nan_to_num(nan=-torch.inf if descending else torch.inf)
        return self._rows_at(key.argsort(descending=descending, stable=True))

    def top(self, k: int, by: Optional[str] = None) -> "NeuronTable":
        """The ``k`` rows with the largest ``|by|`` (default: the first value column)."""
        return self.sort_by(by)._rows_at(slice(0, k))

    def _rows_at(self, index: Union[Tensor, slice]) -> "NeuronTable":
        columns = {name: col[index] for name, col in self.columns.items()}
        return NeuronTable(self.layer, self.hook, self.method, columns, dict(self.baseline), dict(self.uncertainty))

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` (pandas is optional; imported here)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - pandas is installed in dev envs
            raise ImportError("NeuronTable.to_pandas needs pandas; use .rows() without it") from err
        return pd.DataFrame({name: col.cpu().numpy() for name, col in self.columns.items()})
