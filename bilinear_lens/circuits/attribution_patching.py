"""Attribution patching with exactness diagnostics, at the grids' node granularity.

For a node with corrupted activation ``a``, patch difference ``D`` (clean minus corrupted
on the node's entries, see :mod:`bilinear_lens.circuits.patch_nodes`) and metric ``m``
of the corrupted run with the node set to ``a + alpha D``, the effect of patching the node
from corrupted to clean is ``m(1) - m(0) = int_0^1 g(alpha) . D d alpha`` with
``g(alpha) = dm/da`` at ``a + alpha D``. The methods approximate that integral:

- ``"atp"``: ``g(0) . D``, the gradient on the corrupted run times ``clean - corrupted``
  (TransformerLens' ``tools.analysis.attribution_patch`` convention: a positive score means
  patching toward clean raises the metric). Exact when ``m`` is linear in the node.
- ``"two_point"``: ``(g(0) + g(1)) / 2 . D``, the trapezoid rule: exact when ``m`` is at most
  quadratic along the path (a bilinear MLP followed by linear maps, e.g. the last layer's
  MLP input with no final norm), where ``atp`` misses ``D^T Q D``.
- ``("gauss_legendre", k)`` or ``"gauss_legendre:k"``: ``sum_j w_j g(alpha_j) . D`` at the
  ``k`` Gauss-Legendre nodes of ``[0, 1]`` (integrated gradients): exact when the
  integrand ``g(alpha) . D`` is a polynomial of degree ``<= 2k - 1`` in ``alpha``, i.e. when
  the metric is one of degree ``<= 2k``. With attention patterns and norm scales frozen
  (:mod:`bilinear_lens.circuits.freezing`) a bilinear model is a polynomial of degree
  ``2^n`` in an activation read by ``n`` later bilinear MLPs, so ``k = 2^(n-1)`` points
  are exact: 1 (the midpoint) for one MLP, 2 for two, 4 for three.
- ``"exact"``: real activation patching, ``m(1) - m(0)`` (one forward per cell, batched).

Every non-exact method is a weighted sum of gradients at path points; cells are stacked
on the batch axis as in :mod:`bilinear_lens.circuits.patching` (rows ``(cell, point,
example)``), one forward and one backward per chunk. The per-node bilinear remainder of an
``mlp_in`` node of a bilinear layer is ``D^T Q(u) D`` with ``u = dm/d(hook_mlp_out)`` on the
corrupted run: the part of the effect ``atp`` misses through that MLP (all of it when
everything after the MLP is linear). Exact for the observed (frozen) forward, not for
counterfactuals through the softmax or the norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor
from bilinear_lens.progress import progress_bar

from bilinear_lens.circuits.freezing import freeze_hooks
from bilinear_lens.circuits.patch_nodes import Cell, NodeFamily
from bilinear_lens.circuits.patching import (
    DEFAULT_MEMORY_BUDGET,
    FwdHook,
    MetricFn,
    cell_chunks,
    grid_cells,
    patch_hooks,
    resolve_family,
    run_cells,
)
from bilinear_lens.circuits.prompts import Prompts, prompt_pair_tokens

METHODS = ("atp", "two_point", "gauss_legendre", "exact")
FREEZE_AT = ("corrupted", "clean")
Method = Union[str, tuple[str, int]]


def parse_method(method: Method) -> tuple[str, int]:
    """``(name, k)`` of a method spec: ``"atp"``, ``"two_point"``, ``"exact"`` (k 0),
    ``("gauss_legendre", k)`` or ``"gauss_legendre:k"`` (k >= 1)."""
    name, k = method if isinstance(method, tuple) and len(method) == 2 else (method, None)
    if isinstance(name, str) and name.startswith("gauss_legendre:") and k is None:
        name, _, text = name.partition(":")
        k = int(text) if text.isdigit() else text  # type: ignore[assignment]
    if name == "gauss_legendre":
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"method={method!r} is invalid: gauss_legendre needs k >= 1 points, e.g. 'gauss_legendre:2'")
        return name, k
    if name not in METHODS or k is not None:
        raise ValueError(f"method={method!r} is invalid: allowed 'atp', 'two_point', ('gauss_legendre', k) "
                         "or 'gauss_legendre:k', 'exact'")
    return name, 0


def path_rule(name: str, k: int) -> tuple[list[float], list[float]]:
    """Quadrature points ``alpha_j`` in ``[0, 1]`` and weights ``w_j`` of a gradient method."""
    if name == "atp":
        return [0.0], [1.0]
    if name == "two_point":
        return [0.0, 1.0], [0.5, 0.5]
    x, w = np.polynomial.legendre.leggauss(k)  # on [-1, 1]
    return [float((xi + 1) / 2) for xi in x], [float(wi / 2) for wi in w]


@dataclass
class AttributionPatchingResult:
    """Estimated effect of patching each node from corrupted to clean.

    ``scores``: ``[*axes, batch]`` (``axis_names`` as the matching grid); ``method``: the
    method name (``"gauss_legendre:k"`` with its k); ``remainder``: ``D^T Q(u) D`` per
    ``mlp_in`` node of a bilinear layer (same shape), else ``None``; ``metric_corrupted``:
    the metric on the (frozen) corrupted run, ``[batch]``.
    """

    scores: Tensor
    axis_names: list[str]
    method: str
    kind: str
    metric_corrupted: Tensor
    remainder: Optional[Tensor] = None

    def mean(self) -> Tensor:
        """Batch mean per node (what TransformerLens' ``attribution_patch`` reports)."""
        return self.scores.mean(-1)


def _metric_rows(metric: MetricFn, logits: Tensor, batch: int, copies: int) -> Tensor:
    """``[copies, batch]``: the metric of each stacked copy's logits."""
    out = []
    for c in range(copies):
        value = torch.as_tensor(metric(logits[c * batch : (c + 1) * batch]))
        if value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(f"metric must return a [batch] tensor of length {batch}, got shape {tuple(value.shape)}")
        out.append(value)
    return torch.stack(out)


def _capture_hooks(names: Sequence[str], captured: dict[str, Tensor]) -> list[FwdHook]:
    def make(name: str) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            captured[name] = out = act.clone()
            return out
        return hook
    return [(name, make(name)) for name in names]


def _differences(family: NodeFamily, cells: Sequence[Cell], base: dict[str, Tensor], clean_cache: Any) -> dict[int, Tensor]:
    """``D`` of each cell, ``[batch, ...]`` (patched minus base activation at its hook)."""
    out: dict[int, Tensor] = {}
    by_hook: dict[str, list[int]] = {}
    for i, cell in enumerate(cells):
        by_hook.setdefault(family.hook(cell), []).append(i)
    for name, rows in by_hook.items():
        a = base[name]
        for start in range(0, len(rows), 256):  # bound the [n, batch, ...] temporaries
            part = rows[start : start + 256]
            here = a[None].expand(len(part), *a.shape)
            diff = family.apply(here, clean_cache[name].to(a), [cells[i] for i in part]) - here
            out.update({i: diff[j] for j, i in enumerate(part)})
    return out


def _remainders(model: Any, family: NodeFamily, cells: Sequence[Cell], diffs: dict[int, Tensor],
                u_grads: dict[int, Tensor]) -> Optional[Tensor]:
    """``D^T Q(u) D`` per ``mlp_in`` cell ``(layer, pos)`` and example, or ``None`` when the
    family is not ``mlp_in`` or a layer is not bilinear."""
    from bilinear_lens.weights.layer_eigen import bilinear_layer
    from bilinear_lens.weights.tensor import interaction_matrices

    if family.name != "mlp_in":
        return None
    try:
        mlps = {layer: bilinear_layer(model, layer) for layer in range(model.cfg.n_layers)}
    except ValueError:
        return None
    values = []
    for i, (layer, pos) in enumerate(cells):
        u = u_grads[layer][:, pos]  # [batch, d_model]
        Q = interaction_matrices(mlps[layer], u.to(mlps[layer].W_in.dtype))  # [batch, d, d]
        delta = diffs[i][:, pos].to(Q.dtype)  # [batch, d]
        values.append(torch.einsum("bi,bij,bj->b", delta, Q, delta))
    return torch.stack(values)


def attribution_patching(
    model: Any,
    clean: Prompts,
    corrupted: Prompts,
    metric: MetricFn,
    kind: Union[str, NodeFamily] = "resid_pre",
    method: Method = "atp",
    *,
    freeze_patterns: bool = False,
    freeze_norm_scales: bool = False,
    freeze_at: str = "corrupted",
    max_batch: Optional[int] = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
) -> AttributionPatchingResult:
    """Score every node of ``kind`` (a grid family) by ``method`` (see the module docstring).

    ``metric`` maps logits ``[batch, pos, d_vocab]`` to ``[batch]`` (one value per prompt
    pair; TransformerLens' batch mean is :meth:`AttributionPatchingResult.mean`).
    ``freeze_patterns`` / ``freeze_norm_scales``: hold attention patterns / norm scales at
    their values on the ``freeze_at`` run (``"corrupted"``, the run patched into, so the
    baseline is unchanged, or ``"clean"``) in every forward, ``"exact"`` included.
    ``max_batch``: batch rows per forward (cells x path points x prompts).
    """
    name, k = parse_method(method)
    if freeze_at not in FREEZE_AT:
        raise ValueError(f"freeze_at={freeze_at!r} is invalid: allowed {list(FREEZE_AT)}")
    family = resolve_family(kind)
    if freeze_patterns and "pattern" in family.name:
        raise ValueError(f"kind={family.name!r} patches the attention patterns that freeze_patterns=True holds fixed")
    clean_tokens, corrupted_tokens = prompt_pair_tokens(model, clean, corrupted)
    batch, n_pos = corrupted_tokens.shape
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_tokens)
        frozen: list[FwdHook] = []
        if freeze_patterns or freeze_norm_scales:
            source = clean_cache if freeze_at == "clean" else model.run_with_cache(corrupted_tokens)[1]
            frozen = freeze_hooks(model, source, patterns=freeze_patterns, norm_scales=freeze_norm_scales)
    sizes, cells = grid_cells(family, model, n_pos)
    label = name if name != "gauss_legendre" else f"gauss_legendre:{k}"

    # The (frozen) corrupted run, with gradients at the family's hooks (and, for mlp_in,
    # at each MLP's output for the remainder's u).
    hooks = sorted({family.hook(c) for c in cells})
    extra = [f"blocks.{layer}.hook_mlp_out" for layer in range(model.cfg.n_layers)] if family.name == "mlp_in" else []
    captured: dict[str, Tensor] = {}
    with torch.enable_grad(), model.hooks(fwd_hooks=[*frozen, *_capture_hooks(hooks + extra, captured)]):
        base_metric = _metric_rows(metric, model(corrupted_tokens), batch, 1)[0]
        names = hooks + extra
        grads = dict(zip(names, torch.autograd.grad(base_metric.sum(), [captured[n] for n in names], allow_unused=True)))
    base = {n: captured[n].detach() for n in hooks}
    zero_grad = {n: torch.zeros_like(base[n]) if grads[n] is None else grads[n].detach() for n in hooks}

    if name == "exact":
        scores = torch.zeros((len(cells), batch), dtype=base_metric.dtype, device=base_metric.device)
        for i, value in run_cells(model, corrupted_tokens, clean_cache, family, cells, metric, max_batch=max_batch,
                                  memory_budget=memory_budget, extra_hooks=frozen, progress=progress):
            scores[i] = value.to(scores.dtype) - base_metric.detach()
        return AttributionPatchingResult(scores.reshape(*sizes, batch), list(family.axes), label,
                                         family.name, base_metric.detach())

    diffs = _differences(family, cells, base, clean_cache)
    alphas, weights = path_rule(name, k)
    scores = torch.zeros((len(cells), batch), dtype=base_metric.dtype, device=base_metric.device)
    for i, cell in enumerate(cells):  # the alpha = 0 point: one gradient serves every cell
        if 0.0 in alphas:
            scores[i] += weights[alphas.index(0.0)] * (zero_grad[family.hook(cell)] * diffs[i]).flatten(1).sum(-1)
    points = [(a, w) for a, w in zip(alphas, weights) if a != 0.0]
    if points:
        chunks = cell_chunks(cells, batch * len(points), max_batch, model, n_pos, memory_budget)
        for chunk in progress_bar(chunks, desc=f"attribution {label}", unit="forward", enabled=progress, leave=False):
            rows = [(i, a, w) for i in chunk for a, w in points]
            row_cells = [cells[i] for i, _, _ in rows]
            alpha_t = torch.tensor([a for _, a, _ in rows], dtype=torch.float64)
            path_captured: dict[str, Tensor] = {}
            hooks_c = patch_hooks(family, row_cells, clean_cache, batch, alphas=alpha_t, captured=path_captured)
            with torch.enable_grad(), model.hooks(fwd_hooks=[*hooks_c, *frozen]):
                values = _metric_rows(metric, model(corrupted_tokens.repeat(len(rows), 1)), batch, len(rows))
                names_c = list(path_captured)
                grads_c = dict(zip(names_c, torch.autograd.grad(values.sum(), [path_captured[n] for n in names_c],
                                                                allow_unused=True)))
            for r, (i, _, w) in enumerate(rows):
                hook_name = family.hook(cells[i])
                if grads_c[hook_name] is None:  # the metric does not depend on this hook at all
                    continue
                g = grads_c[hook_name].reshape(len(rows), batch, *base[hook_name].shape[1:])[r]
                scores[i] += w * (g.detach() * diffs[i]).flatten(1).sum(-1)

    remainder = None
    if family.name == "mlp_in":
        u_grads = {int(n.split(".")[1]): (torch.zeros_like(captured[n]) if grads[n] is None else grads[n].detach())
                   for n in extra}
        remainder = _remainders(model, family, cells, diffs, u_grads)
    return AttributionPatchingResult(
        scores.reshape(*sizes, batch), list(family.axes), label, family.name, base_metric.detach(),
        None if remainder is None else remainder.reshape(*sizes, batch),
    )
