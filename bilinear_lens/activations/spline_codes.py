"""Spline codes: the on/off pattern of a layer's piecewise-linear units, packed 8 per byte.

Black et al. (2022), "Interpreting Neural Networks through the Polytope Lens": a ReLU layer
cuts its input space into polytopes, one per on/off pattern of its units, and inside one
polytope the layer is affine. The *spline code* of a token is that pattern; tokens with the
same code lie in the same polytope ("region").

**Which units** (``factors``, hook suffixes of ``blocks.{l}.mlp``):

==============  ===========================  ==========================================
mlp kind        default factors              what a region is
==============  ===========================  ==========================================
``relu``        ``("pre",)``                 exact: the MLP is affine on each region
``gelu``        ``("pre",)``                 approximation: GELU is smooth, its sign
                                             pattern marks where it is close to ReLU
``swiglu``      ``("pre",)``                 approximation, as GELU (SiLU gate);
                                             add ``"pre_linear"`` for the finer cells
``bilinear``    ``("pre", "pre_linear")``    sign-pattern cells of a *quadratic* map
``linear``      none (affine everywhere)     one region; pass ``factors`` to force one
==============  ===========================  ==========================================

A bilinear layer is not piecewise linear: ``(W_in x) * (W_gate x)`` is quadratic
everywhere, so its "regions" are the cells where every factor keeps its sign (inside
one, each hidden unit's output keeps its sign but is not affine in ``x``). ``"post"`` (the
sign of the product) is allowed too; for a bilinear layer it is on where the two factors
agree in sign, so it adds nothing once both factors are in the code.

A unit is *on* when its value is ``> 0`` (so exactly ``0`` is off).

**Packing.** ``n`` units take ``ceil(n / 8)`` bytes. Bit order is little-endian within
each byte (``numpy.packbits(..., bitorder="little")``): unit ``i`` is bit ``i % 8``
(value ``1 << (i % 8)``) of byte ``i // 8``; padding bits are 0. Several hooks (factors,
layers) concatenate byte-aligned, one :class:`CodeSegment` each, in the order of
:class:`CodeLayout`. :func:`region_ids` hashes a packed code to a 64-bit region id.

**Residual stream.** A residual vector ``r`` gets the code of the units that read it:
:func:`residual_codes` runs ``r`` as ``blocks.{l}.hook_resid_mid`` through layer ``l``'s
norm and ``W_in``/``W_gate`` (by substituting it in a forward pass, so the same code works
on a ``TransformerBridge``). For the model's own ``hook_resid_mid`` this is the layer's MLP
code. :func:`basis_codes` gives the alternative "sign pattern in a chosen basis",
``r @ basis > 0``.

Functions taking a ``model`` only use ``cfg``, ``hook_dict`` and ``run_with_hooks``
(:class:`~bilinear_lens.models.protocol.HookedModel`), so they accept a :class:`~bilinear_lens.models.model.BilinearTransformer`
or its ``TransformerBridge`` (:func:`bilinear_lens.models.bridge.to_bridge`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Bool, Float, Int, UInt8
from torch import Tensor

from transformer_lens.utilities import get_act_name

from bilinear_lens.activations.capture import capture_activations
from bilinear_lens.models.hook_names import check_hook_names, check_layer, mlp_hook_name
from bilinear_lens.models.mlp_kinds import MLP_KINDS, model_mlp_kind
from bilinear_lens.activations.row_threads import for_row_blocks
from bilinear_lens.models.protocol import HookedModel

BIT_ORDER = "little"
CODE_FACTORS = ("pre", "pre_linear", "post")
# Rows per chunk when packing: keeps the float block and its bool mask in L2 cache.
_PACK_CHUNK_ROWS = 256
# Work per thread below which pack_signs (rows x units) and region_ids (rows x 8-byte
# words) stay on one thread: starting a thread costs tens of microseconds.
_PARALLEL_MIN_VALUES = 1 << 19
_PARALLEL_MIN_WORDS = 1 << 15

Layers = Union[int, Sequence[int]]


# ---- packing -----------------------------------------------------------------------------


def n_code_bytes(n_units: int) -> int:
    """Bytes that ``n_units`` bits take when packed."""
    return (n_units + 7) // 8


def pack_bits(bits: Bool[Tensor, "... d"]) -> UInt8[Tensor, "... n_bytes"]:
    """Pack a bool tensor along its last axis, 8 bits a byte, little-endian bit order."""
    array = bits.detach().cpu().numpy() if isinstance(bits, Tensor) else np.asarray(bits)
    if array.dtype != np.bool_:
        raise TypeError(f"pack_bits expects a bool tensor, got {array.dtype}")
    return torch.from_numpy(np.packbits(array, axis=-1, bitorder=BIT_ORDER))


def unpack_bits(packed: UInt8[Tensor, "... n_bytes"], n_bits: int) -> Bool[Tensor, "... n_bits"]:
    """Inverse of :func:`pack_bits`: the first ``n_bits`` bits of each packed row."""
    array = _as_uint8(packed)
    if n_bits > array.shape[-1] * 8:
        raise ValueError(f"n_bits={n_bits} exceeds the {array.shape[-1] * 8} bits packed")
    bits = np.unpackbits(array, axis=-1, count=n_bits, bitorder=BIT_ORDER)
    return torch.from_numpy(bits.view(np.bool_))


def pack_signs(x: Float[Tensor, "... d"], n_threads: Optional[int] = None) -> UInt8[Tensor, "... n_bytes"]:
    """``pack_bits(x > 0)`` without materialising the whole bool tensor.

    Works on numpy in row chunks (numpy's comparison is several times faster than torch's
    on small CPUs, and a chunk's mask stays in cache for ``packbits``). Large inputs are
    split across ``n_threads`` threads (default ``torch.get_num_threads()``; see
    :mod:`bilinear_lens.activations.row_threads`); the result does not depend on the thread count.
    Right after a multi-threaded torch op, torch's OpenMP workers spin and slow these
    threads; exporting ``OMP_WAIT_POLICY=PASSIVE`` before starting Python avoids that
    (1.06 -> 1.22M tokens/s at d_mlp 2048 after a matmul, see ``benchmarks/polytope.py``).
    """
    values = x.detach().cpu()
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()
    array = values.numpy().reshape(-1, values.shape[-1])
    out = np.empty((array.shape[0], n_code_bytes(array.shape[1])), dtype=np.uint8)

    def pack_rows(start: int, stop: int) -> None:
        mask = np.empty((min(_PACK_CHUNK_ROWS, stop - start), array.shape[1]), dtype=np.bool_)
        for lo in range(start, stop, _PACK_CHUNK_ROWS):
            hi = min(lo + _PACK_CHUNK_ROWS, stop)
            chunk = mask[: hi - lo]
            np.greater(array[lo:hi], 0, out=chunk)
            out[lo:hi] = np.packbits(chunk, axis=-1, bitorder=BIT_ORDER)

    # A thread needs a few chunks' worth of work to pay for itself.
    min_rows = max(1, _PARALLEL_MIN_VALUES // max(1, array.shape[1]))
    for_row_blocks(pack_rows, array.shape[0], min_rows_per_thread=min_rows, n_threads=n_threads)
    return torch.from_numpy(out.reshape(*values.shape[:-1], out.shape[-1]))


def concat_codes(*codes: UInt8[Tensor, "... n_bytes_i"]) -> UInt8[Tensor, "... n_bytes"]:
    """Byte-aligned concatenation: one code whose region is the intersection of the parts'."""
    return torch.cat([torch.as_tensor(_as_uint8(c)) for c in codes], dim=-1)


def _as_uint8(packed: Union[Tensor, np.ndarray]) -> np.ndarray:
    array = packed.detach().cpu().numpy() if isinstance(packed, Tensor) else np.asarray(packed)
    if array.dtype != np.uint8:
        raise TypeError(f"packed codes must be uint8, got {array.dtype}")
    return array


# ---- distances and region ids ---------------------------------------------------------------


def _check_same_width(a: np.ndarray, b: np.ndarray) -> None:
    """``ValueError`` unless two packed code arrays have the same width (last axis)."""
    if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != b.shape[-1]:
        wa = a.shape[-1] if a.ndim else "no"
        wb = b.shape[-1] if b.ndim else "no"
        raise ValueError(
            f"codes of different widths: a has {wa} bytes per code (shape {a.shape}), b has {wb} "
            f"(shape {b.shape}); compare codes of the same layers and factors"
        )


def popcount(packed: UInt8[Tensor, "... n_bytes"]) -> Int[Tensor, "..."]:
    """Number of units on in each code."""
    return torch.from_numpy(np.asarray(np.bitwise_count(_as_uint8(packed)).sum(-1, dtype=np.int64)))


def hamming(a: UInt8[Tensor, "... n_bytes"], b: UInt8[Tensor, "... n_bytes"]) -> Int[Tensor, "..."]:
    """Number of units whose state differs between codes ``a`` and ``b`` (leading axes
    broadcast; both must be codes of the same width, ``n_bytes``)."""
    left, right = _as_uint8(a), _as_uint8(b)
    _check_same_width(left, right)
    try:
        diff = np.bitwise_xor(left, right)
    except ValueError:
        raise ValueError(
            f"hamming: code arrays of shapes {left.shape} and {right.shape} do not broadcast (leading axes)"
        ) from None
    return torch.from_numpy(np.asarray(np.bitwise_count(diff).sum(-1, dtype=np.int64)))


def pairwise_hamming(
    a: UInt8[Tensor, "n n_bytes"], b: Optional[UInt8[Tensor, "m n_bytes"]] = None, chunk_rows: int = 64
) -> Int[Tensor, "n m"]:
    """All Hamming distances between rows of ``a`` and rows of ``b`` (default ``a``),
    by XOR + popcount on the packed bytes, ``chunk_rows`` rows of ``a`` at a time."""
    left = _as_uint8(a)
    right = left if b is None else _as_uint8(b)
    if left.ndim != 2 or right.ndim != 2:
        raise ValueError(f"pairwise_hamming needs [n, n_bytes] code arrays, got shapes {left.shape} and {right.shape}")
    _check_same_width(left, right)
    out = np.empty((left.shape[0], right.shape[0]), dtype=np.int64)
    for start in range(0, left.shape[0], chunk_rows):
        diff = np.bitwise_xor(left[start : start + chunk_rows, None, :], right[None, :, :])
        out[start : start + chunk_rows] = np.bitwise_count(diff).sum(-1, dtype=np.int64)
    return torch.from_numpy(out)


_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SHIFT_1, _SHIFT_2, _SHIFT_3 = np.uint64(30), np.uint64(27), np.uint64(31)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place: a bijection of uint64 with full avalanche.

    One scratch array holds the shifted words (no temporary per operation).
    """
    tmp = np.empty_like(z)
    for shift, mix in ((_SHIFT_1, _MIX_1), (_SHIFT_2, _MIX_2), (_SHIFT_3, None)):
        np.right_shift(z, shift, out=tmp)
        z ^= tmp
        if mix is not None:
            z *= mix
    return z


def region_ids(packed: UInt8[Tensor, "... n_bytes"], n_threads: Optional[int] = None) -> np.ndarray:
    """64-bit id of each packed code (``numpy.uint64``, shape ``packed.shape[:-1]``).

    Each 8-byte word (little-endian, zero-padded) is salted with its index and mixed by
    SplitMix64, and the mixed words are summed mod 2^64. Codes that differ in one word
    never collide; otherwise two distinct codes collide with probability about 2^-64,
    so a dataset with ``R`` regions merges two with probability about ``R^2 / 2^65``.
    Ids are the same on every platform, for every batch split and thread count (large
    inputs are split by rows over ``n_threads`` threads, as in :func:`pack_signs`).
    """
    array = _as_uint8(packed)
    flat = array.reshape(-1, array.shape[-1])
    n_words = max(1, -(-flat.shape[1] // 8))
    if flat.shape[1] != n_words * 8 or not flat.flags.c_contiguous:
        padded = np.zeros((flat.shape[0], n_words * 8), dtype=np.uint8)
        padded[:, : flat.shape[1]] = flat
        flat = padded
    salt = np.arange(1, n_words + 1, dtype=np.uint64) * _GOLDEN
    ids = np.empty(flat.shape[0], dtype=np.uint64)

    def hash_rows(start: int, stop: int) -> None:
        words = np.bitwise_xor(flat[start:stop].view("<u8"), salt)  # a new array: the input is not touched
        _splitmix64(words)
        ids[start:stop] = _splitmix64(words.sum(axis=1, dtype=np.uint64))

    min_rows = max(1, _PARALLEL_MIN_WORDS // n_words)
    for_row_blocks(hash_rows, flat.shape[0], min_rows_per_thread=min_rows, n_threads=n_threads)
    return ids.reshape(array.shape[:-1])


# ---- which units make the code ---------------------------------------------------------------


@dataclass(frozen=True)
class CodeSegment:
    """One hook's units inside a packed code: bytes ``[byte_offset, byte_offset + n_bytes)``."""

    hook_name: str
    n_units: int
    byte_offset: int

    @property
    def n_bytes(self) -> int:
        return n_code_bytes(self.n_units)


@dataclass(frozen=True)
class CodeLayout:
    """Where each hook's units sit in a packed code (byte-aligned, in order)."""

    segments: tuple[CodeSegment, ...]

    @classmethod
    def from_hooks(cls, hooks: Sequence[tuple[str, int]]) -> "CodeLayout":
        """Layout of ``(hook_name, n_units)`` pairs concatenated in order."""
        segments, offset = [], 0
        for name, n_units in hooks:
            segments.append(CodeSegment(name, n_units, offset))
            offset += n_code_bytes(n_units)
        return cls(tuple(segments))

    @property
    def hook_names(self) -> list[str]:
        return [s.hook_name for s in self.segments]

    @property
    def n_bytes(self) -> int:
        return sum(s.n_bytes for s in self.segments)

    @property
    def n_units(self) -> int:
        return sum(s.n_units for s in self.segments)

    def segment(self, hook_name: str) -> CodeSegment:
        for s in self.segments:
            if s.hook_name == hook_name:
                return s
        raise KeyError(f"{hook_name!r} is not in this code layout; it has {self.hook_names}")

    def unpack(self, packed: UInt8[Tensor, "... n_bytes"]) -> Bool[Tensor, "... n_units"]:
        """The bits of all segments, concatenated without padding."""
        return torch.cat([self.unpack_segment(packed, s.hook_name) for s in self.segments], dim=-1)

    def unpack_segment(self, packed: UInt8[Tensor, "... n_bytes"], hook_name: str) -> Bool[Tensor, "... n_units"]:
        """The bits of one hook's units."""
        s = self.segment(hook_name)
        return unpack_bits(packed[..., s.byte_offset : s.byte_offset + s.n_bytes], s.n_units)


def default_factors(mlp_kind: str) -> tuple[str, ...]:
    """The hooks whose signs define a region for ``mlp_kind`` (see the module docstring;
    the factors live in :data:`~bilinear_lens.models.mlp_kinds.MLP_KINDS`)."""
    if mlp_kind not in MLP_KINDS:
        raise ValueError(f"mlp_kind={mlp_kind!r} has no MLP units to make spline codes from")
    factors = MLP_KINDS[mlp_kind].code_factors
    if not factors:  # linear: affine everywhere
        raise ValueError(
            "a linear MLP is affine everywhere, so it has a single region; "
            "pass factors=('pre',) to get its sign pattern anyway"
        )
    return factors


def _as_layer_list(model: HookedModel, layers: Layers) -> list[int]:
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    if not layer_list:
        raise ValueError("layers is empty")
    return [check_layer(model, layer) for layer in layer_list]


def code_layout(model: HookedModel, layers: Layers = 0, factors: Optional[Sequence[str]] = None) -> CodeLayout:
    """Layout of the spline code of ``layers`` (layer-major, then ``factors`` in order)."""
    cfg, kind = model.cfg, model_mlp_kind(model)
    chosen = tuple(factors) if factors is not None else default_factors(kind)
    unknown = [f for f in chosen if f not in CODE_FACTORS]
    if unknown or not chosen:
        raise ValueError(f"factors must be a non-empty subset of {CODE_FACTORS}, got {chosen!r}")
    names = [mlp_hook_name(layer, factor) for layer in _as_layer_list(model, layers) for factor in chosen]
    check_hook_names(model.hook_dict, names, where=f"{type(model).__name__} (mlp_kind={kind!r})")
    return CodeLayout.from_hooks([(name, cfg.d_mlp) for name in names])


def codes_from_activations(
    activations: Mapping[str, Float[Tensor, "... d_mlp"]], layout: CodeLayout
) -> UInt8[Tensor, "... n_bytes"]:
    """Pack the signs of each layout hook's activations (a cache or a dict) into one code."""
    return concat_codes(*[pack_signs(activations[name]) for name in layout.hook_names])


# ---- codes from a model -------------------------------------------------------------------


@torch.no_grad()
def spline_codes(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"],
    layers: Layers = 0,
    factors: Optional[Sequence[str]] = None,
) -> UInt8[Tensor, "batch pos n_bytes"]:
    """Spline codes of every token at ``layers`` (layout: :func:`code_layout`)."""
    layout = code_layout(model, layers, factors)
    return codes_from_activations(capture_activations(model, tokens, layout.hook_names), layout)


@torch.no_grad()
def residual_codes(
    model: HookedModel,
    layer: int,
    resid: Float[Tensor, "... d_model"],
    factors: Optional[Sequence[str]] = None,
    batch_size: int = 4096,
) -> UInt8[Tensor, "... n_bytes"]:
    """Code of layer ``layer``'s units as a function of a residual vector.

    Each vector is substituted for ``blocks.{layer}.hook_resid_mid`` at the only position
    of a one-token forward pass, so it goes through the layer's own norm and
    ``W_in``/``W_gate``; attention and earlier layers play no part (their output at that
    hook is replaced). For the model's own ``hook_resid_mid`` activations this equals
    :func:`spline_codes` at ``layer``.
    """
    layout = code_layout(model, layer, factors)
    flat = resid.reshape(-1, resid.shape[-1])
    parts = []
    for start in range(0, flat.shape[0], batch_size):
        chunk = flat[start : start + batch_size]

        def substitute(value: Tensor, hook: Any, chunk: Tensor = chunk) -> Tensor:
            return chunk[:, None, :].to(value.dtype)

        dummy = torch.zeros(chunk.shape[0], 1, dtype=torch.long, device=chunk.device)
        resid_mid = get_act_name("resid_mid", layer)
        acts = capture_activations(model, dummy, layout.hook_names, [(resid_mid, substitute)])
        parts.append(codes_from_activations(acts, layout)[:, 0])
    packed = torch.cat(parts) if parts else torch.zeros(0, layout.n_bytes, dtype=torch.uint8)
    return packed.reshape(*resid.shape[:-1], layout.n_bytes)


def basis_codes(
    resid: Float[Tensor, "... d_model"], basis: Float[Tensor, "d_model n_directions"]
) -> UInt8[Tensor, "... n_bytes"]:
    """Sign pattern of a residual vector in a chosen basis: ``pack(resid @ basis > 0)``.

    These cells are orthants of the basis, not regions of any layer; useful as a
    layer-free baseline (e.g. with a random or PCA basis of the same size as ``d_mlp``).
    """
    return pack_signs(resid @ basis.to(resid.dtype))
