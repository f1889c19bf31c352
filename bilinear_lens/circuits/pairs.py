"""Exact pair decomposition of a bilinear MLP's output over the residual writers.

For an output direction ``u`` the bilinear MLP of layer ``l`` reads its input ``x`` as a
quadratic form: with the augmented input ``x' = [x, 1]`` and ``Q = Q_aug(u)``
(:func:`~bilinear_lens.weights.tensor.interaction_matrix` with ``include_bias=True``: the
MLP biases sit in the last row/column and corner), ``u . MLP(x) = x'^T Q x'`` exactly.

The MLP input is ``x = ln2(r)`` of the residual ``r = hook_resid_mid[p] = sum_c r_c``
(:mod:`bilinear_lens.circuits.writers`). With the norm's scale ``s`` *frozen* at its value
in the observed forward (``blocks.{l}.ln2.hook_scale``), the norm is affine in ``r``::

    x = sum_c (r_c - [mean(r_c)]) * [w] / s  + [b]

(centring for LN/LNPre, weight for RMS/LN, bias for LN), so each writer maps to its own
input piece ``x'_c = [(r_c - [mean]) * [w] / s, 0]``; LN's bias is its own writer ``ln2 bias``
(``[b, 0]``) and the MLP's biases one more, ``mlp bias`` (``[0, 1]``). Then

    u . hook_mlp_out[p] = sum_{c,d} M[c, d],   M[c, d] = x'_c^T Q x'_d

exactly (float rounding only). ``M`` is symmetric; a writer's *share* is its row sum
``sum_d M[c, d] = x'_c^T Q x' = 1/2 grad F . x'_c`` (Euler: the form is homogeneous of
degree 2 in the augmented input), i.e. half the gradient times the writer.

Caveats: this is exact for the observed forward with the norm scale frozen, not for
counterfactuals (changing a writer would change ``s``); splitting the cross term
``2 x_c^T Q x_d`` evenly between ``c`` and ``d`` (the shares) is a convention, the pair
matrix itself is not. Only bilinear MLPs are quadratic forms: other kinds are refused
naming the kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.circuits.prompts import TokensLike, one_prompt_tokens
from bilinear_lens.weights.layer_eigen import bilinear_layer
from bilinear_lens.circuits.writers import (
    ResidualWriters,
    resolve_positions,
    sae_basis_space,
    sae_writers,
    writer_hook_names,
    writers_from_cache,
)
from bilinear_lens.weights.directions import DirectionLike, resolve_direction
from bilinear_lens.weights.tensor import interaction_matrix

CENTRING_NORMS = ("LN", "LNPre")
WEIGHTED_NORMS = ("RMS", "LN")


@dataclass
class PairDecomposition:
    """``u . hook_mlp_out`` of layer ``layer`` at ``position`` split over writer pairs.

    ``matrix[c, d] = x'_c^T Q_aug(u) x'_d`` (``[n, n]``, symmetric) over the writers
    ``labels`` (``kinds`` as in :data:`~bilinear_lens.circuits.writers.WRITER_KINDS`, plus
    ``ln_bias`` and ``mlp_bias``); ``inputs[c]`` is writer ``c``'s piece of the augmented MLP
    input ``[x, 1]`` (``[n, d_model + 1]``); ``scale`` the frozen norm scale (``None``: no
    norm, or a basis already in MLP-input space); ``observed`` the hooked
    ``u . hook_mlp_out[p]``. Exact for the observed forward with the scale frozen; the
    symmetric split into shares is a convention, the pair matrix is not.
    """

    layer: int
    position: int
    direction: Float[Tensor, "d_model"]
    direction_label: str
    labels: list[str]
    kinds: list[str]
    matrix: Float[Tensor, "n n"]
    inputs: Float[Tensor, "n d_input"]
    scale: Optional[float]
    observed: float
    token_strs: Optional[list[str]] = None

    @property
    def shares(self) -> Float[Tensor, "n"]:
        """Row sums: each writer's share ``x'_c^T Q x'`` (= half-gradient times writer)."""
        return self.matrix.sum(1)

    @property
    def total(self) -> float:
        """``sum_{c,d} M[c, d]``: equals :attr:`observed` up to float rounding."""
        return float(self.matrix.sum())

    def top_pairs(self, k: Optional[int] = 10) -> list[tuple[str, str, float]]:
        """The ``k`` largest ``|value|`` unordered pairs ``(label_c, label_d, value)`` with
        ``c <= d``; an off-diagonal value is ``M[c, d] + M[d, c]`` (both orders), so the
        values over all pairs sum to :attr:`total`."""
        n = self.matrix.shape[0]
        rows, cols = torch.triu_indices(n, n)
        values = self.matrix[rows, cols] * torch.where(rows == cols, 1.0, 2.0).to(self.matrix.dtype)
        order = values.abs().argsort(descending=True)[: (None if k is None else k)]
        return [(self.labels[int(rows[i])], self.labels[int(cols[i])], float(values[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able summary (the full matrix, shares, frozen scale, labels)."""
        return {
            "layer": self.layer, "position": self.position, "direction": self.direction_label,
            "labels": self.labels, "kinds": self.kinds, "matrix": self.matrix.tolist(),
            "shares": self.shares.tolist(), "scale": self.scale, "total": self.total,
            "observed": self.observed, "top_pairs": [list(t) for t in self.top_pairs(20)],
            "token": None if self.token_strs is None else self.token_strs[self.position],
        }

    def _repr_html_(self) -> str:
        from bilinear_lens.views.pair_view import pair_matrix_html

        return pair_matrix_html(self)


def frozen_norm_inputs(
    model: Any, layer: int, vectors: Float[Tensor, "n d_model"], scale: Optional[Tensor], norm: str = "ln2"
) -> tuple[Float[Tensor, "n d_model"], Optional[Tensor]]:
    """The norm ``blocks[layer].{norm}`` with its scale frozen at ``scale`` applied to each
    writer alone, without its bias: ``(r_c - [mean]) * [w] / s``; returns them and the
    norm's bias (``None`` unless LN). ``scale=None``: no norm (``normalization_type=None``)."""
    kind = model.cfg.normalization_type
    if kind is None:
        return vectors, None
    module = getattr(model.blocks[layer], norm)
    out = vectors - vectors.mean(-1, keepdim=True) if kind in CENTRING_NORMS else vectors
    assert scale is not None
    out = out / scale.to(out.dtype)
    if kind in WEIGHTED_NORMS:
        out = out * module.weight.detach().to(out.dtype)
    bias = module.bias.detach().to(out.dtype) if kind == "LN" else None
    return out, bias


def _mlp_has_bias(mlp: Any) -> bool:
    return any(getattr(mlp, name, None) is not None for name in ("b_in", "b_gate", "b_out"))


def _direction_label(model: Any, direction: Any) -> str:
    label = getattr(direction, "label", None)
    if isinstance(label, str):
        return label
    if isinstance(direction, Tensor):
        return "vector"
    tok = getattr(model, "tokenizer", None)

    def name(t: Any) -> str:
        return repr(tok.decode([t])) if isinstance(t, int) and tok is not None else repr(t)

    if isinstance(direction, tuple):
        return f"logit[{name(direction[0])}] - logit[{name(direction[1])}]"
    return name(direction)


def check_sae_input_layer(model: Any, sae: Any, layer: int) -> None:
    space, sae_layer = sae_basis_space(model, sae)
    ok = (space == "mlp_input" and sae_layer == layer) or sae.cfg.hook_name == f"blocks.{layer}.hook_resid_mid"
    if not ok:
        raise ValueError(
            f"sae.cfg.hook_name={sae.cfg.hook_name!r} is not layer {layer}'s MLP input: use an SAE on "
            f"blocks.{layer}.hook_resid_mid or blocks.{layer}.mlp.hook_in"
        )


@torch.no_grad()
def mlp_pair_decomposition(
    model: Any,
    tokens: TokensLike,
    layer: int,
    direction: DirectionLike,
    position: int = -1,
    writers: Union[str, ResidualWriters, Any] = "components",
    include_error: bool = True,
) -> PairDecomposition:
    """Split ``u . hook_mlp_out`` of bilinear layer ``layer`` at ``position`` (default: the
    last) of one prompt into writer-pair terms (module docstring).

    ``direction``: anything :func:`~bilinear_lens.weights.directions.resolve_direction`
    takes (a token, a ``(a, b)`` logit difference, a vector, a ``FeatureDirection``).
    ``writers``: ``"components"`` (embedding, heads, earlier MLPs, bias:
    :func:`~bilinear_lens.circuits.writers.residual_writers` at ``hook_resid_mid``), an SAE
    on ``blocks.{layer}.hook_resid_mid`` or ``blocks.{layer}.mlp.hook_in`` (its features, its
    ``b_dec`` and, with ``include_error``, the error writer:
    :func:`~bilinear_lens.circuits.writers.sae_writers`), or precomputed
    :class:`~bilinear_lens.circuits.writers.ResidualWriters` of that hook. Works on our
    model and on ``to_bridge(model)``; a layer whose MLP is not bilinear is refused naming
    its kind.
    """
    mlp = bilinear_layer(model, layer)
    u = resolve_direction(model, direction)
    tokens = one_prompt_tokens(model, tokens)
    (p,) = resolve_positions(position, tokens.shape[1], "position")
    resid_hook = f"blocks.{layer}.hook_resid_mid"
    norm_kind = model.cfg.normalization_type
    names = [resid_hook, f"blocks.{layer}.hook_mlp_out"] + ([f"blocks.{layer}.ln2.hook_scale"] if norm_kind else [])
    if isinstance(writers, str):
        if writers != "components":
            raise ValueError(f"writers={writers!r} is invalid: 'components', an SAE, or ResidualWriters")
        names += writer_hook_names(model, layer, "mid")
    _, cache = model.run_with_cache(tokens, names_filter=sorted(set(names)))
    if isinstance(writers, str):
        found = writers_from_cache(model, cache, resid_hook, [p], tokens)
    elif isinstance(writers, ResidualWriters):
        found = writers
        if found.positions != [p] and p not in found.positions:
            raise ValueError(f"writers were taken at positions {found.positions}, not at position={position!r}")
        if found.space == "residual" and found.hook != resid_hook:
            raise ValueError(f"writers of {found.hook!r} are not layer {layer}'s MLP input ({resid_hook})")
        if found.space == "mlp_input" and found.layer != layer:
            raise ValueError(f"writers of {found.hook!r} are not layer {layer}'s MLP input")
    else:
        check_sae_input_layer(model, writers, layer)
        found = sae_writers(model, tokens, writers, [p], include_error=include_error)
    i = found.positions.index(p)
    dtype = found.vectors.dtype
    vectors = found.vectors[:, i]  # [n, d_model]
    labels, kinds = list(found.labels), list(found.kinds)
    scale = None
    if found.space == "residual" and norm_kind is not None:
        scale_t = cache[f"blocks.{layer}.ln2.hook_scale"][0, p]  # [1]
        scale = float(scale_t)
        inputs, ln_bias = frozen_norm_inputs(model, layer, vectors, scale_t, "ln2")
        if ln_bias is not None:
            inputs = torch.cat([inputs, ln_bias[None]])
            labels.append("ln2 bias"), kinds.append("ln_bias")
    else:
        inputs = vectors
    inputs = torch.cat([inputs, inputs.new_zeros(inputs.shape[0], 1)], dim=-1)  # [x_c, 0]
    if _mlp_has_bias(mlp):
        one = inputs.new_zeros(1, inputs.shape[1])
        one[0, -1] = 1.0
        inputs = torch.cat([inputs, one])
        labels.append("mlp bias"), kinds.append("mlp_bias")
    Q = interaction_matrix(mlp, u.to(mlp.W_in.dtype), include_bias=True).to(dtype)
    matrix = inputs @ Q @ inputs.T
    matrix = (matrix + matrix.T) / 2  # exact symmetry (Q is symmetric; rounding is not)
    observed = float(cache[f"blocks.{layer}.hook_mlp_out"][0, p].to(dtype) @ u.to(dtype))
    strs = None
    if getattr(model, "tokenizer", None) is not None:
        strs = [model.tokenizer.decode([int(t)]) for t in tokens[0]]
    return PairDecomposition(layer, p, u, _direction_label(model, direction), labels, kinds, matrix, inputs,
                             scale, observed, strs)
