"""Node families: what a patching grid (or an attribution-patching sweep) patches, cell by cell.

A family names a hook point per layer, the axes of its cells and how one cell patches the
corrupted activation ``a`` toward the clean one ``c``. Every patch is ``a + D`` with
``D = patch(a, c) - a`` (``D`` is the clean-minus-corrupt difference on the cell's
entries, zero elsewhere; for an eigen-component it is ``(v_i . (c - a)) v_i`` at one
position), so attribution patching's path ``a + alpha D`` is defined for every family.

================================  ===============================  ==========================
family                            hook                             cell axes (TL's layout)
================================  ===============================  ==========================
``embed``                         ``hook_embed``                   pos
``resid_pre/resid_mid/resid_post``  ``blocks.{l}.hook_<name>``     layer, pos
``attn_out``, ``mlp_out``         ``blocks.{l}.hook_<name>``       layer, pos
``mlp_in``                        ``blocks.{l}.mlp.hook_in``       layer, pos
``attn_head_{out,q,k,v}_by_pos``  ``blocks.{l}.attn.hook_{z,q,k,v}``  layer, pos, head
``attn_head_{out,q,k,v}_all_pos`` the same                         layer, head
``attn_head_pattern_by_pos``      ``blocks.{l}.attn.hook_pattern`` layer, head_index, dest_pos
``attn_head_pattern_all_pos``     the same                         layer, head_index
``mlp_in_eigen``                  ``blocks.{l}.mlp.hook_in``       component, pos (one layer)
================================  ===============================  ==========================

The grids' values equal ``transformer_lens.patching.get_act_patch_<family>`` (same axes,
same order) cell for cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

Cell = tuple[int, ...]

_BLOCK_HOOKS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
_HEAD_ACTS = {"out": "z", "q": "q", "k": "k", "v": "v"}


@dataclass(frozen=True)
class NodeFamily:
    """One patchable family (see the module table).

    ``axes``: cell axis names; ``hook(cell)``: the hook point of a cell; ``select`` maps
    each non-layer axis to the activation dimension it indexes (batch excluded), ``None``
    for custom families that define ``apply`` themselves.
    """

    name: str
    axes: tuple[str, ...]
    hook_of: Callable[[Cell], str]
    select: Optional[tuple[Optional[int], ...]] = None
    custom_apply: Optional[Callable[[Tensor, Tensor, Sequence[Cell]], Tensor]] = None

    def hook(self, cell: Cell) -> str:
        return self.hook_of(cell)

    def axis_sizes(self, model: Any, n_pos: int) -> tuple[int, ...]:
        sizes = {"layer": model.cfg.n_layers, "pos": n_pos, "dest_pos": n_pos, "head": model.cfg.n_heads,
                 "head_index": model.cfg.n_heads}
        return tuple(sizes[a] if a in sizes else self._extra_size(a) for a in self.axes)

    def _extra_size(self, axis: str) -> int:
        raise ValueError(f"family {self.name!r}: axis {axis!r} has no default size")

    def apply(self, corrupted: Tensor, clean: Tensor, cells: Sequence[Cell]) -> Tensor:
        """The patched activations of ``cells``: ``corrupted`` is ``[n_cells, batch, ...]``
        (row ``i`` the activation cell ``i`` sees), ``clean`` is ``[batch, ...]``."""
        if self.custom_apply is not None:
            return self.custom_apply(corrupted, clean, cells)
        assert self.select is not None
        mask = torch.zeros((len(cells),) + tuple(clean.shape[1:]), dtype=torch.bool, device=clean.device)
        for i, cell in enumerate(cells):
            index: list[Any] = [slice(None)] * (clean.dim() - 1)
            for value, dim in zip(cell, self.select):
                if dim is not None:
                    index[dim] = value
            mask[(i, *index)] = True
        return torch.where(mask[:, None], clean[None].to(corrupted.dtype), corrupted)


def _block_hook(name: str) -> Callable[[Cell], str]:
    return lambda cell: f"blocks.{cell[0]}.hook_{name}"


def _family_table() -> dict[str, NodeFamily]:
    table = {"embed": NodeFamily("embed", ("pos",), lambda cell: "hook_embed", (0,))}
    for name in _BLOCK_HOOKS:
        table[name] = NodeFamily(name, ("layer", "pos"), _block_hook(name), (None, 0))
    table["mlp_in"] = NodeFamily("mlp_in", ("layer", "pos"), lambda cell: f"blocks.{cell[0]}.mlp.hook_in", (None, 0))
    for short, act in _HEAD_ACTS.items():
        hook: Callable[[Cell], str] = lambda cell, act=act: f"blocks.{cell[0]}.attn.hook_{act}"
        table[f"attn_head_{short}_by_pos"] = NodeFamily(f"attn_head_{short}_by_pos", ("layer", "pos", "head"), hook, (None, 0, 1))
        table[f"attn_head_{short}_all_pos"] = NodeFamily(f"attn_head_{short}_all_pos", ("layer", "head"), hook, (None, 1))
    pattern: Callable[[Cell], str] = lambda cell: f"blocks.{cell[0]}.attn.hook_pattern"
    table["attn_head_pattern_by_pos"] = NodeFamily(
        "attn_head_pattern_by_pos", ("layer", "head_index", "dest_pos"), pattern, (None, 0, 1))
    table["attn_head_pattern_all_pos"] = NodeFamily("attn_head_pattern_all_pos", ("layer", "head_index"), pattern, (None, 0))
    return table


NODE_FAMILIES: dict[str, NodeFamily] = _family_table()
# The families with a fixed table entry; "mlp_in_eigen" is built per layer and direction.
FAMILY_NAMES = tuple(NODE_FAMILIES) + ("mlp_in_eigen",)


def node_family(name: str) -> NodeFamily:
    """The family called ``name`` (``ValueError`` naming the value and the allowed ones)."""
    if name == "mlp_in_eigen":
        raise ValueError("kind='mlp_in_eigen' needs a layer and a direction: use eigen_family(model, layer, u, k)")
    if name not in NODE_FAMILIES:
        raise ValueError(f"kind={name!r} is invalid: allowed {list(FAMILY_NAMES)}")
    return NODE_FAMILIES[name]


@dataclass(frozen=True)
class EigenFamily(NodeFamily):
    """MLP-input eigen-components of one bilinear layer: cell ``(i, p)`` sets the coefficient
    of the MLP input at position ``p`` along eigenvector ``v_i`` of ``Q(u)`` to its clean
    value, ``x + (v_i . (x_clean - x)) v_i`` (the ``v_i`` are orthonormal, sorted by
    ``|lambda_i|``). As ``u . MLP(x) = sum_i lambda_i (v_i . x)^2``, each cell moves one
    term of the layer's output along ``u``."""

    eigenvalues: Optional[Tensor] = None
    eigenvectors: Optional[Tensor] = None  # [d_model, k]

    def axis_sizes(self, model: Any, n_pos: int) -> tuple[int, ...]:
        assert self.eigenvectors is not None
        return (self.eigenvectors.shape[1], n_pos)

    def apply(self, corrupted: Tensor, clean: Tensor, cells: Sequence[Cell]) -> Tensor:
        assert self.eigenvectors is not None
        vectors = self.eigenvectors.to(device=corrupted.device, dtype=corrupted.dtype)
        comps = torch.tensor([c[0] for c in cells], device=corrupted.device)
        pos = torch.tensor([c[1] for c in cells], device=corrupted.device)
        rows = torch.arange(len(cells), device=corrupted.device)
        v = vectors.T[comps]  # [n, d]
        here = corrupted[rows, :, pos]  # [n, batch, d]
        coef = ((clean[:, pos].transpose(0, 1).to(corrupted.dtype) - here) * v[:, None]).sum(-1)  # [n, batch]
        out = corrupted.clone()
        out[rows, :, pos] = here + coef[..., None] * v[:, None]
        return out


def eigen_family(model: Any, layer: int, u: Tensor, k: int = 8) -> EigenFamily:
    """The :class:`EigenFamily` of ``layer`` for output direction ``u`` (``[d_model]``, e.g.
    from :func:`~bilinear_lens.weights.directions.resolve_direction`), top ``k`` components
    of ``Q(u)`` by ``|lambda|`` (:func:`~bilinear_lens.weights.eigen.eigendecompose`, dense).
    A layer that is not bilinear is refused naming its kind."""
    from bilinear_lens.weights.layer_eigen import bilinear_layer
    from bilinear_lens.weights.eigen import eigendecompose
    from bilinear_lens.weights.tensor import interaction_matrix

    mlp = bilinear_layer(model, layer)
    d = model.cfg.d_model
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d:
        raise ValueError(f"k={k!r} is invalid: must be an integer in [1, {d}] (d_model)")
    u = torch.as_tensor(u).to(device=mlp.W_in.device, dtype=mlp.W_in.dtype)
    with torch.no_grad():
        eig = eigendecompose(interaction_matrix(mlp, u)).top(k)
    name = f"blocks.{layer}.mlp.hook_in"
    return EigenFamily(name="mlp_in_eigen", axes=("component", "pos"), hook_of=lambda cell: name,
                       eigenvalues=eig.eigenvalues.detach(), eigenvectors=eig.eigenvectors.detach())
