"""The bilinear MLP as a third-order tensor, and its interaction matrices.

A bilinear MLP (no biases) computes ``MLP(x)[a] = sum_ij B[a, i, j] x_i x_j`` with

    B[a, i, j] = sum_h W_out[h, a] W_in[i, h] W_gate[j, h]

(TransformerLens orientation: ``W_in``/``W_gate`` ``[d_model, d_mlp]``, ``W_out``
``[d_mlp, d_model]``). Reading the output along a direction ``u`` gives a quadratic form,
``u . MLP(x) = x^T Q(u) x``, with the symmetric *interaction matrix*

    Q(u) = sym(W_in diag(c) W_gate^T),   c = W_out u,   sym(A) = (A + A^T) / 2.

Everything here is computed from the weight factors in ``O(d_mlp d_model^2)`` per
direction; only :func:`bilinear_tensor` builds the dense ``B`` (``d_model^3`` numbers).

Biases (``include_bias=True``) use the augmented input ``x' = [x, 1]`` (``d_model + 1``
dims, see :func:`augment_input`): ``b_in``/``b_gate`` become an extra last row of
``W_in``/``W_gate``, and ``u . b_out`` is added to the ``(last, last)`` entry of ``Q``, so
``x'^T Q(u) x' == u . MLP(x)`` exactly. Without biases (the default) the bias terms are
ignored: ``Q`` then describes the purely quadratic part of the MLP.

Every function takes the MLP by duck typing: anything with ``W_in``, ``W_gate``,
``W_out`` (and optionally ``b_in``, ``b_gate``, ``b_out``) attributes in this orientation
(our :class:`~bilinear_lens.models.mlp.BilinearMLP`, TransformerLens' ``TransformerBridge`` gated
MLP components) or a :class:`BilinearWeights`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Optional, Union

import einops
import torch
from jaxtyping import Float
from torch import Tensor

# Dense B above this many elements is refused (2**28 floats = 1 GiB in float32).
MAX_TENSOR_ELEMENTS = 2**28
# Working memory targeted by the automatic chunk size of interaction_matrices.
CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class BilinearWeights:
    """The weights of a bilinear MLP, in TransformerLens orientation.

    ``MLP(x) = ((x @ W_in + b_in) * (x @ W_gate + b_gate)) @ W_out + b_out``. Biases are
    optional (``None`` means zero). Shapes and dtypes are validated on construction.
    """

    W_in: Float[Tensor, "d_model d_mlp"]
    W_gate: Float[Tensor, "d_model d_mlp"]
    W_out: Float[Tensor, "d_mlp d_out"]
    b_in: Optional[Float[Tensor, "d_mlp"]] = None
    b_gate: Optional[Float[Tensor, "d_mlp"]] = None
    b_out: Optional[Float[Tensor, "d_out"]] = None

    def __post_init__(self) -> None:
        for name in ("W_in", "W_gate", "W_out", "b_in", "b_gate", "b_out"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(value).__name__}")
        for name in ("W_in", "W_gate", "W_out"):
            if getattr(self, name).ndim != 2:
                raise ValueError(f"{name} must be 2-D, got shape {tuple(getattr(self, name).shape)}")
        if self.W_gate.shape != self.W_in.shape:
            raise ValueError(
                f"W_gate shape {tuple(self.W_gate.shape)} != W_in shape {tuple(self.W_in.shape)} "
                "(both are [d_model, d_mlp])"
            )
        if self.W_out.shape[0] != self.d_mlp:
            raise ValueError(
                f"W_out shape {tuple(self.W_out.shape)} does not start with d_mlp={self.d_mlp} "
                f"(W_in shape {tuple(self.W_in.shape)}); W_out is [d_mlp, d_model]"
            )
        for name, size in (("b_in", self.d_mlp), ("b_gate", self.d_mlp), ("b_out", self.d_out)):
            bias = getattr(self, name)
            if bias is not None and tuple(bias.shape) != (size,):
                raise ValueError(f"{name} shape {tuple(bias.shape)} != ({size},)")
        for name in ("W_gate", "W_out", "b_in", "b_gate", "b_out"):
            value = getattr(self, name)
            if value is not None and (value.dtype != self.W_in.dtype or value.device != self.W_in.device):
                raise ValueError(
                    f"{name} is {value.dtype} on {value.device} but W_in is "
                    f"{self.W_in.dtype} on {self.W_in.device}; all weights must match"
                )

    @property
    def d_model(self) -> int:
        """Input dimension (rows of ``W_in``)."""
        return self.W_in.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.W_in.shape[1]

    @property
    def d_out(self) -> int:
        """Output dimension (``d_model`` for a transformer MLP)."""
        return self.W_out.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_in.dtype

    @property
    def device(self) -> torch.device:
        return self.W_in.device

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "BilinearWeights":
        """These weights on ``device`` in ``dtype`` (``None``: keep the current one)."""
        fields = (self.W_in, self.W_gate, self.W_out, self.b_in, self.b_gate, self.b_out)
        return BilinearWeights(*(None if t is None else t.to(device=device or t.device, dtype=dtype or t.dtype) for t in fields))

    def d_input(self, include_bias: bool) -> int:
        """Dimension ``Q`` lives in: ``d_model``, or ``d_model + 1`` with the bias row."""
        return self.d_model + int(include_bias)

    @classmethod
    def from_module(cls, mlp: Any) -> "BilinearWeights":
        """Read ``W_in, W_gate, W_out, b_*`` from ``mlp`` (detached: analysis needs no grads).

        Accepts a :class:`BilinearWeights` (returned as is) or any object with those
        attributes. Refuses an MLP that declares a non-identity activation (e.g. SwiGLU),
        whose output is not a quadratic form.
        """
        if isinstance(mlp, BilinearWeights):
            return mlp
        missing = [name for name in ("W_in", "W_gate", "W_out") if getattr(mlp, name, None) is None]
        if missing:
            raise ValueError(
                f"{type(mlp).__name__} has no {', '.join(missing)}: expected a gated (bilinear) MLP "
                "with W_in, W_gate [d_model, d_mlp] and W_out [d_mlp, d_model]"
            )
        act_name = getattr(mlp, "act_name", "identity")
        if act_name != "identity":
            raise ValueError(f"{type(mlp).__name__} has activation {act_name!r}; only a bilinear MLP (identity) is a quadratic form")

        def get(name: str) -> Optional[Tensor]:
            value = getattr(mlp, name, None)
            return None if value is None else value.detach()

        return cls(*(get(name) for name in ("W_in", "W_gate", "W_out", "b_in", "b_gate", "b_out")))


MLPLike = Union[BilinearWeights, Any]


def augment_input(x: Float[Tensor, "... d_model"], value: float = 1.0) -> Float[Tensor, "... d_model_plus_1"]:
    """``[x, value]``: append a constant (1 for inputs, 0 for pure directions) to the last dim."""
    return torch.cat([x, x.new_full((*x.shape[:-1], 1), value)], dim=-1)


def input_factors(
    mlp: MLPLike, include_bias: bool = False
) -> tuple[Float[Tensor, "d_input d_mlp"], Float[Tensor, "d_input d_mlp"]]:
    """``(L, R)`` with ``Q(u) = sym(L diag(W_out u) R^T)`` (+ the ``b_out`` corner).

    ``L = W_in``, ``R = W_gate``; with ``include_bias`` each gets its bias as an extra last
    row (zeros where the bias is ``None``), the augmented-input trick.
    """
    w = BilinearWeights.from_module(mlp)
    if not include_bias:
        return w.W_in, w.W_gate

    def with_bias_row(W: Tensor, b: Optional[Tensor]) -> Tensor:
        row = W.new_zeros(1, W.shape[1]) if b is None else b[None, :]
        return torch.cat([W, row], dim=0)

    return with_bias_row(w.W_in, w.b_in), with_bias_row(w.W_gate, w.b_gate)


def check_directions(w: BilinearWeights, U: Tensor, name: str, ndim: int) -> Tensor:
    """``U`` (one direction ``[d_model]`` for ``ndim=1``, or ``[n_dirs, d_model]``) in the
    weights' dtype and device; a wrong shape or a NaN/inf entry (:func:`check_finite`,
    naming the rows) raises ``ValueError`` naming ``name``."""
    if not isinstance(U, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(U).__name__}")
    if U.ndim != ndim or U.shape[-1] != w.d_out:
        expected = "[d_model]" if ndim == 1 else "[n_dirs, d_model]"
        raise ValueError(f"{name} must be {expected} with d_model={w.d_out}, got shape {tuple(U.shape)}")
    check_finite(U, name)
    return U.to(dtype=w.dtype, device=w.device)


# Dtypes the eigensolvers compute in (``torch.linalg.eigh`` has no half-precision or integer kernel).
EIGH_DTYPES = (torch.float32, torch.float64)
_SHOWN = 8  # offending rows/entries listed in a message


def check_eigh_dtype(dtype: Any, what: Optional[str], weights: bool = False) -> torch.dtype:
    """``dtype`` if it is float32 or float64, else a ``ValueError`` naming ``what`` (the
    argument, e.g. ``"dtype"``) and the value: the eigendecompositions have no kernel for
    half precision (``eigh`` raises deep inside torch) and an integer dtype would truncate
    every ``Q`` (to zeros for unit directions), a silently wrong result. ``weights``: the
    dtype is the weights' own (no dtype was asked for), and the message says so, pointing
    to the ``what`` argument that would convert them, or (``what=None``: the function has
    none) to converting the module."""
    if dtype not in EIGH_DTYPES:
        allowed = "eigendecompositions compute in torch.float32 or torch.float64"
        if weights and what is None:
            raise ValueError(f"the weights are {dtype!r}: {allowed}; convert them (e.g. mlp.float())")
        if weights:
            raise ValueError(f"the weights are {dtype!r}: {allowed}; pass {what}=torch.float32 (or convert the weights)")
        raise ValueError(f"{what}={dtype!r} is not supported: {allowed}")
    return dtype


def _listed(indices: list, total: int, noun: str) -> str:
    shown = ", ".join(str(i) for i in indices[:_SHOWN]) + (", ..." if len(indices) > _SHOWN else "")
    return f"{noun} [{shown}] ({len(indices)} of {total})"


def check_finite(x: Tensor, what: str, item_dims: int = 1) -> None:
    """Raise ``ValueError`` ``"<what> contains NaN or inf in rows [...] (m of n)"`` unless every
    entry of ``x`` is finite. An item is the last ``item_dims`` dims (1: the rows of a
    direction matrix; 2: the matrices of a batch); ``x`` of at most ``item_dims`` dims is one
    item, and its offending entries are named instead. Integer tensors always pass."""
    if not (x.is_floating_point() or x.is_complex()):
        return
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return
    if x.ndim <= item_dims:
        flat = bad.reshape(-1)
        where = _listed(flat.nonzero().flatten().tolist(), flat.numel(), "at entries")
    else:
        per_item = bad.flatten(-item_dims).any(-1)
        found = per_item.nonzero()
        indices = [tuple(i) if len(i) > 1 else i[0] for i in found.tolist()]
        noun = "in rows" if item_dims == 1 else "in matrices"
        where = _listed(indices, per_item.numel(), noun)
    raise ValueError(f"{what} contains NaN or inf {where}")


def check_vectors(x: Tensor, d: int, name: str, include_bias: bool) -> None:
    """Raise ``ValueError`` unless the last dim of ``x`` is ``d`` (the input dimension)."""
    if x.ndim == 0 or x.shape[-1] != d:
        hint = " (include_bias=True: append a 1 with augment_input)" if include_bias else ""
        raise ValueError(f"{name} last dim must be {d}{hint}, got shape {tuple(x.shape)}")


def bilinear_output(mlp: MLPLike, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_out"]:
    """``MLP(x) = ((x @ W_in + b_in) * (x @ W_gate + b_gate)) @ W_out + b_out``, from the weights.

    Always includes the biases that exist; the reference the quadratic forms reproduce.
    """
    w = BilinearWeights.from_module(mlp)
    check_vectors(x, w.d_model, "x", include_bias=False)
    x = x.to(dtype=w.dtype, device=w.device)
    left = x @ w.W_in + (0 if w.b_in is None else w.b_in)
    right = x @ w.W_gate + (0 if w.b_gate is None else w.b_gate)
    out = (left * right) @ w.W_out
    return out if w.b_out is None else out + w.b_out


def bilinear_tensor(
    mlp: MLPLike, include_bias: bool = False, max_elements: Optional[int] = MAX_TENSOR_ELEMENTS
) -> Float[Tensor, "d_out d_input d_input"]:
    """The dense third-order tensor ``B[a, i, j] = sum_h W_out[h, a] W_in[i, h] W_gate[j, h]``.

    Only for small layers: it has ``d_out * d_input^2`` entries (``d_model=4096`` would
    be 275 GB in float32), so it is refused above ``max_elements`` (``None`` disables
    the check). Prefer :func:`interaction_matrix`, which contracts ``B`` with a direction
    without building it. ``B`` is *not* symmetrized in ``(i, j)``; ``MLP(x)[a] =
    einsum('aij,i,j', B, x, x)`` either way. With ``include_bias``, ``i, j`` range over the
    augmented input ``[x, 1]`` and ``B[a, -1, -1]`` additionally holds ``b_out[a]``.
    """
    w = BilinearWeights.from_module(mlp)
    d = w.d_input(include_bias)
    n_elements = w.d_out * d * d
    if max_elements is not None and n_elements > max_elements:
        raise ValueError(
            f"dense bilinear tensor would have {w.d_out}x{d}x{d} = {n_elements:,} elements "
            f"(> max_elements={max_elements:,}); use interaction_matrix / interaction_matrices, "
            "which never build it, or pass max_elements=None to force"
        )
    # B[a] is the unsymmetrized interaction matrix of the basis direction e_a.
    basis = torch.eye(w.d_out, dtype=w.dtype, device=w.device)
    return torch.cat(
        [chunk.matrices for chunk in _iter_matrices(w, basis, None, include_bias, symmetric=False)]
    )


def interaction_matrix(
    mlp: MLPLike, u: Float[Tensor, "d_model"], include_bias: bool = False
) -> Float[Tensor, "d_input d_input"]:
    """``Q(u) = sym(W_in diag(W_out u) W_gate^T)``, so ``x^T Q(u) x = u . MLP(x)``.

    ``O(d_mlp d_model^2)`` time, ``O(d_mlp d_model)`` extra memory; ``B`` is never built.
    With ``include_bias`` it is ``[d_model + 1, d_model + 1]`` (see module docstring).
    """
    w = BilinearWeights.from_module(mlp)
    u = check_directions(w, u, "u", ndim=1)
    return interaction_matrices(w, u[None], chunk_size=1, include_bias=include_bias)[0]


class InteractionChunk(NamedTuple):
    """Interaction matrices for directions ``U[start : start + len(matrices)]``."""

    start: int
    matrices: Float[Tensor, "chunk d_input d_input"]

    @property
    def stop(self) -> int:
        return self.start + self.matrices.shape[0]


def auto_chunk_size(mlp: MLPLike, include_bias: bool = False, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Directions per chunk so one chunk's working memory (``chunk * d_input * (d_mlp + 2 d_input)``
    elements) stays near ``chunk_bytes`` (at least one direction)."""
    w = BilinearWeights.from_module(mlp)
    d = w.d_input(include_bias)
    per_direction = d * (w.d_mlp + 2 * d) * w.W_in.element_size()
    return max(1, chunk_bytes // per_direction)


def _iter_matrices(
    w: BilinearWeights, U: Tensor, chunk_size: Optional[int], include_bias: bool, symmetric: bool
) -> Iterator[InteractionChunk]:
    L, R = input_factors(w, include_bias)
    if chunk_size is None:
        chunk_size = auto_chunk_size(w, include_bias)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    d = L.shape[0]
    for start in range(0, U.shape[0], chunk_size):
        U_chunk = U[start : start + chunk_size]
        C = U_chunk @ w.W_out.T  # [chunk, d_mlp]: the per-neuron output weights c = W_out u
        # One GEMM for the whole chunk: rows (n, i) of (L * c_n) times R^T.
        scaled = einops.rearrange(L[None, :, :] * C[:, None, :], "n i h -> (n i) h")
        Q = einops.rearrange(scaled @ R.T, "(n i) j -> n i j", i=d)
        del scaled
        if symmetric:
            Q = (Q + Q.mT) / 2
        if include_bias and w.b_out is not None:
            Q[:, -1, -1] += U_chunk @ w.b_out
        yield InteractionChunk(start, Q)


def iter_interaction_matrices(
    mlp: MLPLike,
    U: Float[Tensor, "n_dirs d_model"],
    chunk_size: Optional[int] = None,
    include_bias: bool = False,
) -> Iterator[InteractionChunk]:
    """Yield ``InteractionChunk(start, Q[start:stop])`` with ``Q[n] = Q(U[n])`` chunk by chunk.

    Peak memory is one chunk (``chunk_size`` directions; ``None`` picks
    :func:`auto_chunk_size`), so callers can consume (e.g. eigendecompose) every direction of
    a vocabulary without holding all ``n_dirs * d^2`` numbers.
    """
    w = BilinearWeights.from_module(mlp)
    U = check_directions(w, U, "U", ndim=2)
    return _iter_matrices(w, U, chunk_size, include_bias, symmetric=True)


def interaction_matrices(
    mlp: MLPLike,
    U: Float[Tensor, "n_dirs d_model"],
    chunk_size: Optional[int] = None,
    include_bias: bool = False,
) -> Float[Tensor, "n_dirs d_input d_input"]:
    """``Q[n] = sym(W_in diag(W_out U[n]) W_gate^T)`` for every direction, computed in chunks.

    The result holds all ``n_dirs * d^2`` numbers; to stream instead use
    :func:`iter_interaction_matrices`.
    """
    w = BilinearWeights.from_module(mlp)
    U = check_directions(w, U, "U", ndim=2)
    d = w.d_input(include_bias)
    out = torch.empty(U.shape[0], d, d, dtype=w.dtype, device=w.device)
    for chunk in _iter_matrices(w, U, chunk_size, include_bias, symmetric=True):
        out[chunk.start : chunk.stop] = chunk.matrices
    return out


def quadratic_form(
    Q: Float[Tensor, "*batch d d"], x: Float[Tensor, "*batch d"]
) -> Float[Tensor, "*batch"]:
    """``x^T Q x``; the batch dims of ``Q`` and ``x`` broadcast against each other."""
    if Q.ndim < 2 or Q.shape[-1] != Q.shape[-2]:
        raise ValueError(f"Q must be [..., d, d], got shape {tuple(Q.shape)}")
    check_vectors(x, Q.shape[-1], "x", include_bias=False)
    return (x[..., None, :] @ Q @ x[..., :, None])[..., 0, 0]


def interaction(
    mlp: MLPLike,
    u: Float[Tensor, "d_model"],
    f1: Union[Float[Tensor, "d_input"], Float[Tensor, "n1 d_input"]],
    f2: Union[Float[Tensor, "d_input"], Float[Tensor, "n2 d_input"]],
    include_bias: bool = False,
) -> Union[Float[Tensor, ""], Float[Tensor, "n1 n2"]]:
    """``f1^T Q(u) f2``: how input directions ``f1`` and ``f2`` jointly drive output ``u``.

    For sets ``F1 [n1, d]``, ``F2 [n2, d]`` returns the sub-matrix ``F1 Q(u) F2^T``
    ``[n1, n2]`` (e.g. sentiment words x negation words). Computed from the factors in
    ``O((n1 + n2) d d_mlp + n1 n2 d_mlp)``, without forming ``Q``:
    ``(1/2) [(F1 L) diag(c) (F2 R)^T + (F1 R) diag(c) (F2 L)^T]`` with ``c = W_out u``.
    With ``include_bias`` the vectors are augmented (``[x, 1]`` for inputs, ``[f, 0]`` for
    pure directions; see :func:`augment_input`) and the ``b_out`` corner is included.
    """
    w = BilinearWeights.from_module(mlp)
    u = check_directions(w, u, "u", ndim=1)
    d = w.d_input(include_bias)
    for name, f in (("f1", f1), ("f2", f2)):
        if f.ndim not in (1, 2):
            raise ValueError(f"{name} must be [d] or [n, d], got shape {tuple(f.shape)}")
        check_vectors(f, d, name, include_bias)
    single = f1.ndim == 1 and f2.ndim == 1
    F1 = f1.reshape(-1, d).to(dtype=w.dtype, device=w.device)
    F2 = f2.reshape(-1, d).to(dtype=w.dtype, device=w.device)
    L, R = input_factors(w, include_bias)
    c = w.W_out @ u
    out = ((F1 @ L) * c) @ (F2 @ R).T + ((F1 @ R) * c) @ (F2 @ L).T
    out = out / 2
    if include_bias and w.b_out is not None:
        out = out + (u @ w.b_out) * torch.outer(F1[:, -1], F2[:, -1])
    if single:
        return out[0, 0]
    return out.reshape(*f1.shape[:-1], *f2.shape[:-1])


__all__ = [
    "BilinearWeights",
    "InteractionChunk",
    "augment_input",
    "auto_chunk_size",
    "bilinear_output",
    "bilinear_tensor",
    "EIGH_DTYPES",
    "check_directions",
    "check_eigh_dtype",
    "check_finite",
    "check_vectors",
    "input_factors",
    "interaction",
    "interaction_matrices",
    "interaction_matrix",
    "iter_interaction_matrices",
    "quadratic_form",
]
