"""Batched activation-patching grids: every cell of a grid stacked on the batch axis.

TransformerLens' ``transformer_lens.patching.get_act_patch_*`` run one forward per cell.
Here the cells of a grid (see :mod:`bilinear_lens.circuits.patch_nodes`) are stacked:
a chunk of ``n`` cells runs as one forward over ``n`` copies of the corrupted batch
(rows ``c * batch + b``), each copy patched at its own cell, and the metric is applied
to each copy's logits ``[batch, pos, d_vocab]`` exactly as TransformerLens applies it to
one forward's, so the values are the same cell for cell. Chunks hold at most
``max_batch`` rows (default: as many as ``memory_budget`` bytes of activations allow). On
our model the blocks before a chunk's first patched block run once, not once per copy.

Results are TransformerLens' ``PatchingResult`` (per-example values, ``baseline``,
``effect()``, ``normalized()``, ``bootstrap_ci()``), extended with the clean run's metric
(:class:`GridResult.clean_baseline`, :meth:`GridResult.recovery`). Works on
:class:`~bilinear_lens.models.model.BilinearTransformer` and on ``to_bridge(model)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from bilinear_lens.progress import progress_bar
from transformer_lens.patching import PatchingResult, make_df_from_ranges

from bilinear_lens.circuits.patch_nodes import Cell, NodeFamily, node_family
from bilinear_lens.circuits.prompts import Prompts, prompt_pair_tokens

MetricFn = Callable[[Tensor], Tensor]
FwdHook = tuple[str, Callable[..., Any]]
REDUCE_MODES = ("scalar", "mean", "none")
# Bytes of activations per chunk. Larger chunks do not run faster on CPU (measured on a
# 4-layer d_model 64 model: 64-row chunks 1.2 s, 1024-row chunks 2.3 s for 1024 cells, as
# the activations fall out of cache), so the default stays modest.
DEFAULT_MEMORY_BUDGET = 1 << 27


@dataclass
class GridResult(PatchingResult):
    """A ``PatchingResult`` with the clean run's metric: ``clean_baseline`` shaped like
    ``baseline`` (``[batch]``), and ``recovery() = (values - corrupted) / (clean - corrupted)``
    (0: the patch did nothing, 1: it restored the clean metric)."""

    clean_baseline: Optional[Tensor] = None

    def recovery(self) -> Tensor:
        if self.clean_baseline is None:
            raise ValueError("recovery needs the clean metric; build the grid with patch_grid(..., baseline=True)")
        return self.normalized(self.clean_baseline)


def rows_per_forward(model: Any, n_pos: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Batch rows one forward may hold within ``memory_budget`` bytes: a row's activations
    are about ``n_pos * (n_layers * (12 d_model + 3 d_mlp + 3 n_heads n_pos) + 2 d_vocab)``
    numbers (residual hooks, q/k/v/z, the MLP's hidden layer, scores and patterns, logits)."""
    cfg = model.cfg
    itemsize = next(model.parameters()).element_size()
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    per_row = n_pos * (cfg.n_layers * (12 * cfg.d_model + 3 * d_mlp + 3 * cfg.n_heads * n_pos) + 2 * cfg.d_vocab)
    return max(1, memory_budget // max(1, per_row * itemsize))


def cell_chunks(cells: Sequence[Cell], batch: int, max_batch: Optional[int], model: Any, n_pos: int,
                memory_budget: int) -> list[list[int]]:
    """Cell indices in chunks of at most ``max_batch // batch`` cells (at least one)."""
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch={max_batch!r} is invalid: must be an integer >= 1 (batch rows per forward)")
    rows = max_batch if max_batch is not None else rows_per_forward(model, n_pos, memory_budget)
    per_chunk = max(1, rows // batch)
    order = list(range(len(cells)))
    return [order[i : i + per_chunk] for i in range(0, len(order), per_chunk)]


def patch_hooks(family: NodeFamily, cells: Sequence[Cell], clean_cache: Any, batch: int,
                alphas: Optional[Tensor] = None, captured: Optional[dict[str, Tensor]] = None) -> list[FwdHook]:
    """Hooks patching copy ``i`` of a ``[len(cells) * batch, ...]`` forward at ``cells[i]``.

    ``alphas`` (``[len(cells)]``): copy ``i`` gets ``a + alphas[i] * (patch(a) - a)``, the
    point at ``alphas[i]`` on the straight path from corrupted (0) to patched (1); ``None``
    is the patch itself. ``captured``: filled with each hook's output tensor (for gradients).
    """
    by_hook: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        by_hook.setdefault(family.hook(cell), []).append(i)
    hooks = []
    for name, rows in by_hook.items():
        clean = clean_cache[name]

        def hook(act: Tensor, hook: Any, rows: list[int] = rows, clean: Tensor = clean, name: str = name) -> Tensor:
            view = act.reshape(len(cells), batch, *act.shape[1:])
            index = torch.tensor(rows, device=act.device)
            here = view[index]
            patched = family.apply(here, clean.to(act.device), [cells[i] for i in rows])
            if alphas is not None:
                a = alphas[index].to(act.device, act.dtype).reshape(-1, *([1] * (here.dim() - 1)))
                patched = here + a * (patched - here)
            out = view.index_copy(0, index, patched).reshape(act.shape)
            if captured is not None:
                captured[name] = out
            return out

        hooks.append((name, hook))
    return hooks


def _metric_values(metric: MetricFn, logits: Tensor, per_example: bool, batch: int, reduce: str) -> Tensor:
    out = torch.as_tensor(metric(logits))
    if per_example and (out.dim() != 1 or out.shape[0] != batch):
        raise ValueError(
            f"patching_metric must return a [batch] tensor of length {batch} under reduce={reduce!r}, "
            f"got shape {tuple(out.shape)}"
        )
    if not per_example and out.dim() != 0:
        raise ValueError(
            f"patching_metric must return a scalar under reduce='scalar', got shape {tuple(out.shape)}; "
            "return a [batch] tensor and pass reduce='mean' or reduce='none'"
        )
    return out.detach()


def _hook_layer(name: str) -> Optional[int]:
    """``l`` of a hook inside ``blocks.{l}``, ``None`` for ``hook_embed`` and the like."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit() else None


def shared_prefix_layer(model: Any, family: NodeFamily, cells: Sequence[Cell]) -> Optional[int]:
    """The first block any of ``cells`` patches, when every copy can share the corrupted
    run up to it (our model's ``stop_at_layer``/``start_at_layer``); ``None`` otherwise
    (the bridge, a cell at ``hook_embed``, or block 0)."""
    from bilinear_lens.models.model import BilinearTransformer

    if not isinstance(model, BilinearTransformer):
        return None
    layers = [_hook_layer(family.hook(c)) for c in cells]
    if any(layer is None for layer in layers):
        return None
    return min(layers) or None  # type: ignore[type-var]


def stacked_forward(model: Any, corrupted_tokens: Tensor, copies: int, hooks: Sequence[FwdHook],
                    extra_hooks: Sequence[FwdHook], start: Optional[int]) -> Tensor:
    """Logits of ``copies`` stacked copies of the corrupted batch under ``hooks`` (and
    ``extra_hooks``). With ``start``, blocks before it run once on the batch (they are the
    same for every copy: no hook of ``hooks`` sits there) and the copies start at block
    ``start`` from that residual stream."""
    if start is None:
        return model.run_with_hooks(corrupted_tokens.repeat(copies, 1), fwd_hooks=[*hooks, *extra_hooks])
    with model.hooks(fwd_hooks=list(extra_hooks)):
        resid = model(corrupted_tokens, stop_at_layer=start)
    return model.run_with_hooks(resid.repeat(copies, 1, 1), start_at_layer=start, fwd_hooks=[*hooks, *extra_hooks])


def run_cells(model: Any, corrupted_tokens: Tensor, clean_cache: Any, family: NodeFamily, cells: Sequence[Cell],
              metric: MetricFn, *, max_batch: Optional[int] = None, memory_budget: int = DEFAULT_MEMORY_BUDGET,
              extra_hooks: Sequence[FwdHook] = (), progress: bool = True, per_example: bool = True,
              reduce: str = "none") -> Iterator[tuple[int, Tensor]]:
    """``(cell index, metric value)`` for every cell, one forward per chunk (no gradients).
    ``extra_hooks`` run in every forward (e.g. :func:`~bilinear_lens.circuits.freezing.freeze_hooks`)."""
    batch, n_pos = corrupted_tokens.shape
    chunks = cell_chunks(cells, batch, max_batch, model, n_pos, memory_budget)
    for chunk in progress_bar(chunks, desc=f"patching {family.name}", unit="forward", enabled=progress, leave=False):
        chunk_cells = [cells[i] for i in chunk]
        hooks = patch_hooks(family, chunk_cells, clean_cache, batch)
        start = shared_prefix_layer(model, family, chunk_cells)
        with torch.no_grad():
            logits = stacked_forward(model, corrupted_tokens, len(chunk), hooks, extra_hooks, start)
        for j, i in enumerate(chunk):
            yield i, _metric_values(metric, logits[j * batch : (j + 1) * batch], per_example, batch, reduce)


def grid_cells(family: NodeFamily, model: Any, n_pos: int) -> tuple[tuple[int, ...], list[Cell]]:
    """The grid's axis sizes and its cells in TransformerLens' order (last axis fastest)."""
    sizes = family.axis_sizes(model, n_pos)
    cells = [tuple(int(v) for v in row) for row in make_df_from_ranges(sizes, family.axes).itertuples(index=False)]
    return sizes, cells


def resolve_family(kind: Union[str, NodeFamily]) -> NodeFamily:
    return kind if isinstance(kind, NodeFamily) else node_family(kind)


def batched_activation_patch(
    model: Any,
    corrupted_tokens: Tensor,
    clean_cache: Any,
    patching_metric: MetricFn,
    kind: Union[str, NodeFamily] = "resid_pre",
    *,
    reduce: str = "scalar",
    baseline: bool = False,
    max_batch: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    extra_hooks: Sequence[FwdHook] = (),
    progress: bool = True,
) -> Union[Tensor, GridResult]:
    """TransformerLens' ``get_act_patch_<kind>(model, corrupted_tokens, clean_cache,
    patching_metric, reduce=, baseline=)``, batched (see the module docstring).

    ``kind``: a name of :data:`~bilinear_lens.circuits.patch_nodes.FAMILY_NAMES` or a
    family (``eigen_family(...)``). ``reduce``/``baseline`` as TransformerLens: the metric
    returns a scalar under ``"scalar"`` and ``[batch]`` otherwise; with ``reduce="none"`` or
    ``baseline=True`` a :class:`GridResult` (values ``[*axes, batch]`` or ``[*axes]``),
    else the tensor of values ``[*axes]``. ``max_batch``: batch rows per forward.
    """
    if reduce not in REDUCE_MODES:
        raise ValueError(f"reduce={reduce!r} is invalid: allowed {list(REDUCE_MODES)}")
    if corrupted_tokens.dim() != 2:
        raise ValueError(f"corrupted_tokens must be [batch, pos], got shape {tuple(corrupted_tokens.shape)}")
    family = resolve_family(kind)
    probe = clean_cache[family.hook(tuple(0 for _ in family.axes))]
    if probe.shape[0] != corrupted_tokens.shape[0] or (probe.dim() > 1 and "pattern" not in family.name
                                                       and probe.shape[1] != corrupted_tokens.shape[1]):
        raise ValueError(
            f"the clean cache has activations {tuple(probe.shape)} but corrupted_tokens is {tuple(corrupted_tokens.shape)}: "
            "clean and corrupted prompts must have the same batch and length"
        )
    batch, n_pos = corrupted_tokens.shape
    sizes, cells = grid_cells(family, model, n_pos)
    per_example = reduce != "scalar"
    store: Optional[Tensor] = None
    for i, value in run_cells(model, corrupted_tokens, clean_cache, family, cells, patching_metric,
                              max_batch=max_batch, memory_budget=memory_budget, extra_hooks=extra_hooks,
                              progress=progress, per_example=per_example, reduce=reduce):
        if store is None:
            store = torch.zeros((len(cells),) + tuple(value.shape), dtype=value.dtype, device=value.device)
        store[i] = value
    assert store is not None
    values = store.reshape(sizes + tuple(store.shape[1:]))
    base = None
    if baseline:
        with torch.no_grad():
            logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=list(extra_hooks))
        base = _metric_values(patching_metric, logits, per_example, batch, reduce).to(values.dtype)
    if reduce == "mean":
        values = values.mean(-1)
        base = None if base is None else base.mean(-1)
    if reduce != "none" and not baseline:
        return values
    return GridResult(values=values, axis_names=list(family.axes), index_df=make_df_from_ranges(sizes, family.axes),
                      metric_names=["metric"], reduced=reduce != "none", baseline=base)


def patch_grid(
    model: Any,
    clean: Prompts,
    corrupted: Prompts,
    metric: MetricFn,
    kind: Union[str, NodeFamily] = "resid_pre",
    *,
    reduce: str = "none",
    baseline: bool = True,
    max_batch: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    extra_hooks: Sequence[FwdHook] = (),
    progress: bool = True,
) -> Union[Tensor, GridResult]:
    """A batched patching grid from prompts: ``clean``/``corrupted`` texts (tokenized one by
    one, refused if they differ in length or would need padding) or ``[batch, pos]`` ids.

    Caches the clean run, patches each cell of ``kind`` into the corrupted run and returns
    :func:`batched_activation_patch`'s result; with ``baseline`` the :class:`GridResult`
    also carries the clean metric (``clean_baseline``, for :meth:`GridResult.recovery`).
    """
    clean_tokens, corrupted_tokens = prompt_pair_tokens(model, clean, corrupted)
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean_tokens)
    result = batched_activation_patch(model, corrupted_tokens, cache, metric, kind, reduce=reduce, baseline=baseline,
                                      max_batch=max_batch, memory_budget=memory_budget, extra_hooks=extra_hooks,
                                      progress=progress)
    if isinstance(result, GridResult) and result.baseline is not None:
        if extra_hooks:
            with torch.no_grad():
                clean_logits = model.run_with_hooks(clean_tokens, fwd_hooks=list(extra_hooks))
        clean_value = _metric_values(metric, clean_logits, reduce != "scalar", clean_tokens.shape[0], reduce)
        result.clean_baseline = (clean_value.mean(-1) if reduce == "mean" else clean_value).to(result.values.dtype)
    return result
