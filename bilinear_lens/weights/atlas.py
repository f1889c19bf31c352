"""The eigen atlas: top-``k`` eigenpairs of ``Q(u)`` for every direction of a set, every layer.

For each layer and each row ``u`` of a direction matrix ``U [n_dirs, d_model]`` (all
vocabulary tokens, a token list, SAE features: any matrix), the atlas stores the ``k``
largest-``|lambda|`` eigenpairs of ``Q(u)``, ``||Q(u)||_F`` and the captured energy
``sum_{i<k} lambda_i^2 / ||Q(u)||_F^2``, streamed to disk shard by shard
(:mod:`bilinear_lens.weights.atlas_store`; resumable: finished shards are skipped, the
shard size comes from the index, and a resume whose settings differ from the recorded
ones is refused naming each differing field). Stored eigenvectors follow the sign
convention of :class:`~bilinear_lens.weights.eigen.Eigendecomposition`, so they equal
:func:`~bilinear_lens.weights.eigen.eigendecompose_directions`' up to the solver tolerance.

**Algorithm (chosen by FLOP counts and measurement; see NOTES).** Forming ``Q(u)`` from
the factors costs ``2 d^2 d_mlp`` per direction. The ``"dense_b"`` route instead builds the
symmetrised tensor once, packed to its upper tile triangle
(:class:`~bilinear_lens.weights.packed_tensor.PackedSymmetricTensor`, ``P ~ d^2 / 2``
numbers per output dim, ``2 d_out d_mlp P`` FLOPs), and forms a chunk of ``Q`` as one GEMM
``U_chunk @ packed`` (``2 d_out P`` per direction) plus tile copies. ``route="auto"`` takes
it when the packed ``B`` fits in ``memory_bytes`` and the total FLOPs are lower (more than
~310 directions at d 512 / d_mlp 2048), else ``"factored"``. Top-``k`` then comes from
batched block Krylov on the formed ``Q``, ``KRYLOV_BATCH`` matrices at a time on the CPU
(the whole chunk elsewhere; :func:`~bilinear_lens.weights.batched_eigen.batched_top_eigenpairs`, which hands a matrix
to the exact ``eigh`` as soon as that is predicted cheaper), not a full ``eigh``.

Under ``torchrun`` (:mod:`bilinear_lens.distributed`) shards are split round-robin over the
ranks; each shard's start block is seeded by its position, so the atlas is the same for
any number of processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.distributed import barrier, current_ranks, resolve_device
from bilinear_lens.field_errors import FieldError, FieldMessage, literal
from bilinear_lens.output_locks import ATLAS_LOCK_FILE, claim_atlas_dir
from bilinear_lens.progress import progress_bar
from bilinear_lens.weights.atlas_store import (
    INDEX_FILE,
    AtlasError,
    EigenAtlas,
    ShardSpec,
    fingerprint,
    plan_shards,
    read_index,
    shard_is_done,
    write_index,
    write_shard,
)
from bilinear_lens.weights.batched_eigen import batched_top_eigenpairs
from bilinear_lens.weights.directions import TokenLike, token_directions, token_id
from bilinear_lens.weights.layer_eigen import bilinear_layer
from bilinear_lens.weights.packed_tensor import PackedSymmetricTensor, packed_size
from bilinear_lens.weights.eigen import check_weights_finite
from bilinear_lens.weights.tensor import (
    BilinearWeights,
    MLPLike,
    auto_chunk_size,
    check_eigh_dtype,
    check_finite,
    iter_interaction_matrices,
)

ROUTES = ("auto", "dense_b", "factored")
# Extra memory the dense-B route may take for B (the budget: < 1 GB extra peak).
ATLAS_MEMORY_BYTES = 512 * 2**20
# Working memory of one chunk of directions: the GEMM output, the formed Q and the Krylov
# basis. Larger chunks read the packed B fewer times (at 32 directions per chunk the
# contraction was bound by reading B, not by FLOPs; NOTES).
ATLAS_CHUNK_BYTES = 256 * 2**20
# Matrices per Krylov batch on the CPU: 16 formed d-512 Q (16 MiB) stay in cache across the
# restarts' products; measured 6.1 ms per matrix vs 7.5 with all 128 of a chunk at once
# (NOTES). Other devices take the whole chunk per batch: that cache argument is the CPU's,
# and a GPU needs many matrices per call to be busy (not measured here: no GPU was lent).
KRYLOV_BATCH = 16
# Top pairs per direction and directions per shard of a new atlas (a resume keeps the
# recorded values).
DEFAULT_K = 8
DEFAULT_SHARD_SIZE = 512
# The index fields a resume must match, and where each requested value comes from for error
# messages: a parameter of build_atlas (a field of the error, which a command may name by its
# flag: bilinear_lens.field_errors), else what the value is derived from.
INDEX_FIELDS = {
    "layers": "layers", "k": "k", "d": "the model's d_model, +1 with include_bias", "n_dirs": "the directions",
    "labels": "the directions", "label_name": "the directions' kind", "dtype": "dtype", "tol": "tol",
    "include_bias": "include_bias", "shard_size": "shard_size",
}
PARAMETERS = ("layers", "k", "dtype", "tol", "include_bias", "shard_size", "device", "resume", "out")
# How the library's own messages word the fields that are not plain values.
LIBRARY_NAMES = {"resume": "resume=True", "out": "out directory"}


class AtlasSettingsError(FieldMessage, AtlasError):
    """An :class:`~bilinear_lens.weights.atlas_store.AtlasError` naming build_atlas parameters
    (``fields``; :mod:`bilinear_lens.field_errors`)."""

    def __init__(self, template: str, fields: tuple[str, ...]):
        super().__init__(template, fields, LIBRARY_NAMES)


def _atlas_error(template: str) -> AtlasSettingsError:
    """An :class:`AtlasSettingsError` whose fields are the parameters ``template`` names."""
    return AtlasSettingsError(template, tuple(p for p in PARAMETERS if "{" + p + "}" in template))


def krylov_batch(device: torch.device, chunk: int) -> int:
    """Matrices per :func:`batched_top_eigenpairs` call for a chunk of ``chunk`` on ``device``."""
    return KRYLOV_BATCH if device.type == "cpu" else chunk


def choose_route(w: BilinearWeights, n_dirs: int, include_bias: bool = False, memory_bytes: int = ATLAS_MEMORY_BYTES) -> str:
    """``"dense_b"`` when the packed ``B`` fits in ``memory_bytes`` and needs fewer FLOPs
    (building it, ``2 d_out d_mlp P``, plus ``2 n d_out P`` to contract, against ``2 n d^2
    d_mlp`` from the factors; ``P ~ d^2 / 2``), else ``"factored"``."""
    d = w.d_input(include_bias)
    P = packed_size(d)
    b_bytes = w.d_out * P * w.W_in.element_size()
    fewer_flops = w.d_out * w.d_mlp * P + n_dirs * w.d_out * P < n_dirs * d * d * w.d_mlp
    return "dense_b" if fewer_flops and b_bytes <= memory_bytes else "factored"


def _chunks(
    w: BilinearWeights, U: Tensor, B: Optional[PackedSymmetricTensor], include_bias: bool, chunk_size: int
) -> Iterator[tuple[int, Tensor]]:
    """``(start, Q[start:stop])`` chunk by chunk, from the packed ``B`` or from the factors."""
    if B is None:
        for chunk in iter_interaction_matrices(w, U, chunk_size, include_bias):
            yield chunk.start, chunk.matrices
        return
    for start in range(0, U.shape[0], chunk_size):
        yield start, B.contract(U[start : start + chunk_size])


def _shard_tensors(
    w: BilinearWeights, U: Tensor, B: Optional[PackedSymmetricTensor], k: int, include_bias: bool, tol: float, seed: int
) -> tuple[dict[str, Tensor], int]:
    """The stored tensors of one shard (directions ``U``) and how many rows needed exact ``eigh``."""
    d = w.d_input(include_bias)
    out = {
        "eigenvalues": U.new_empty(U.shape[0], k),
        "eigenvectors": U.new_empty(U.shape[0], d, k),
        "frobenius_norm": U.new_empty(U.shape[0]),
        "captured_energy": U.new_empty(U.shape[0]),
    }
    gen = torch.Generator(device=U.device).manual_seed(seed)
    exact_rows = 0
    # Q chunks of ~ATLAS_CHUNK_BYTES: GEMM output, formed Q and Krylov work (dense B), or the
    # factored working set.
    if B is not None:
        chunk_size = max(1, ATLAS_CHUNK_BYTES // ((B.packed.shape[1] + 2 * d * d) * U.element_size()))
    else:
        chunk_size = auto_chunk_size(w, include_bias)
    for start, Q_chunk in _chunks(w, U, B, include_bias, chunk_size):
        batch = krylov_batch(Q_chunk.device, Q_chunk.shape[0])
        for sub in range(0, Q_chunk.shape[0], batch):
            Q = Q_chunk[sub : sub + batch]
            rows = slice(start + sub, start + sub + Q.shape[0])
            top = batched_top_eigenpairs(Q, k, tol=tol, generator=gen)
            norm = torch.linalg.matrix_norm(Q)
            out["eigenvalues"][rows], out["eigenvectors"][rows] = top.eig.eigenvalues, top.eig.eigenvectors
            out["frobenius_norm"][rows] = norm
            out["captured_energy"][rows] = torch.where(norm > 0, top.eig.eigenvalues.pow(2).sum(-1) / norm.pow(2).clamp_min(1e-30), 0.0)
            exact_rows += top.exact_rows
    return out, exact_rows


def _show(value: Any) -> str:
    """An index value for an error message; long lists (all-token labels) abbreviated."""
    if isinstance(value, list) and len(value) > 8:
        return "[" + ", ".join(map(str, value[:4])) + f", ... ({len(value)} in all)]"
    return str(value)


def index_differences(path: Path, found: Mapping[str, Any], index: Mapping[str, Any]) -> list[str]:
    """``"field: recorded (in path/index.json) != requested ({source})"`` (message templates,
    :mod:`bilinear_lens.field_errors`: a parameter source is a ``{parameter}`` placeholder)
    for every field of :data:`INDEX_FIELDS` where the atlas at ``path`` (index ``found``) and
    the requested ``index`` differ; a requested ``None`` (``shard_size`` not given) matches anything."""
    out = []
    for field, source in INDEX_FIELDS.items():
        old, new = found.get(field), index.get(field)
        if old == new or (field == "shard_size" and new is None):
            continue
        where = ""
        if isinstance(old, list) and isinstance(new, list) and len(old) == len(new) > 8:
            first = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
            where = f", first difference at position {first}"
        named = "{" + source + "}" if source in PARAMETERS else literal(source)
        out.append(literal(f"{field}: {_show(old)} (in {path / INDEX_FILE}) != {_show(new)} (") + named
                   + literal(f"){where}"))
    return out


def _check_out_dir(path: Path, index: dict, resume: bool) -> Optional[dict]:
    """The index of the existing atlas at ``path`` to resume (``None``: ``path`` needs a new
    atlas); raises :class:`AtlasError` for anything else, naming every recorded field that
    differs from ``index`` (:func:`index_differences`), or, when all agree but the
    fingerprint does not, saying the weights or directions differ. Read-only, so every
    rank can run it before rank 0 writes (a rank checking after rank 0 wrote the index
    would see an atlas that "exists" and refuse it)."""
    if (path / INDEX_FILE).exists():
        if not resume:  # first: without --resume no setting of the old atlas matters
            raise _atlas_error(literal(f"atlas dir {path} exists; ") + "resume it with {resume} or use a new {out}")
        found = read_index(path)
        differences = index_differences(path, found, index)
        if differences:
            raise _atlas_error(literal(f"atlas dir {path} was built with other settings: ") + "; ".join(differences)
                               + "; resume with the recorded ones or use a new {out}")
        if found.get("fingerprint") != index["fingerprint"]:
            raise _atlas_error(literal(
                f"atlas dir {path} was built from other weights or directions (every recorded setting matches; "
                f"fingerprint {str(found.get('fingerprint', '?'))[:12]} != {index['fingerprint'][:12]}); ")
                + "use a new {out}")
        return found
    _check_directory_path(path)
    if path.exists() and any(not _is_bookkeeping(child.name) for child in path.iterdir()):
        raise _atlas_error(literal(f"{path} exists and is not an atlas directory (no index.json); ") + "use a new {out}")
    return None


def _is_bookkeeping(name: str) -> bool:
    """The lock file, or a writer's temporary (``.NAME.tmp-PID...``): not atlas content."""
    return name == ATLAS_LOCK_FILE or (name.startswith(".") and ".tmp-" in name)


def _check_directory_path(path: Path) -> None:
    """:class:`AtlasError` unless ``path`` is a directory or can be made one: a regular file
    at ``path`` or at one of its parents would otherwise end in a raw ``NotADirectoryError``."""
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                what = f"atlas dir {path} is a file" if place == path else f"atlas dir {path}: {place} is a file"
                raise _atlas_error(literal(f"{what}, not a directory; ") + "use a new {out}")
            return


def build_atlas(
    layers: Mapping[int, MLPLike],
    directions: Float[Tensor, "n_dirs d_model"],
    out: Union[str, Path],
    k: Optional[int] = None,
    labels: Optional[Sequence[int]] = None,
    label_name: str = "row",
    shard_size: Optional[int] = None,
    route: str = "auto",
    include_bias: bool = False,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
    tol: float = 1e-4,
    resume: bool = False,
    progress: bool = True,
) -> EigenAtlas:
    """Compute (or finish) the atlas of ``directions`` for each ``layers[l]`` MLP into ``out``.

    ``labels`` name the rows (e.g. token ids, ``label_name="token"``). ``tol`` is the
    relative residual every stored pair reaches (``1e-4``: eigenvalues to ~1e-4 of
    ``max|lambda|``). ``device``/``dtype`` are where and in what precision to compute
    (default: the first layer's device, float32). ``resume=True`` keeps finished shards
    of an existing atlas of the same fingerprint and settings and computes the rest.
    ``k`` (pairs kept per direction) and ``shard_size`` (directions per shard): ``None``
    means :data:`DEFAULT_K` / :data:`DEFAULT_SHARD_SIZE` for a new atlas and the recorded
    value on resume; a value other than the recorded one is refused. It is not in the fingerprint: it is layout, and the stored pairs agree to
    ``tol`` (same signs) whatever the shards. Raises
    :class:`~bilinear_lens.weights.atlas_store.AtlasError` for a foreign or damaged atlas
    directory (naming each setting that differs from the recorded one) and ``ValueError``
    for bad arguments (``k`` above ``d``, a non-bilinear layer, a ``device`` other than
    :func:`bilinear_lens.distributed.resolve_device` allows, a ``dtype`` other than float32 /
    float64, directions or weights holding NaN or inf), naming the argument and value.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if not layers:
        raise ValueError("layers is empty: give at least one {layer: mlp}")
    try:
        device = None if device is None else resolve_device(device, what="device")
    except ValueError as err:
        raise FieldError.from_prefixed("device", err) from None
    try:
        check_eigh_dtype(dtype, "dtype")
    except ValueError as err:
        raise FieldError.from_prefixed("dtype", err) from None
    weights = {layer: BilinearWeights.from_module(mlp) for layer, mlp in sorted(layers.items())}
    for layer, w in weights.items():
        check_weights_finite(w, f"layer {layer} ")
    weights = {layer: w.to(device, dtype) for layer, w in weights.items()}
    first = next(iter(weights.values()))
    d = first.d_input(include_bias)
    if not isinstance(directions, Tensor):
        raise TypeError(f"directions must be a torch.Tensor, got {type(directions).__name__}")
    if directions.ndim != 2 or directions.shape[1] != first.d_out:
        raise ValueError(f"directions must be [n_dirs, {first.d_out}], got shape {tuple(directions.shape)}")
    check_finite(directions, "directions")
    path = Path(out)
    if k is None:  # the recorded k on resume (it is in the fingerprint, so it is read first)
        recorded = read_index(path).get("k") if resume and (path / INDEX_FILE).is_file() else None
        k = recorded if isinstance(recorded, int) else DEFAULT_K
    if not 1 <= k <= d:
        raise FieldError("{k}" + f" must be in [1, {d}] (d_model), got {k}", ("k",))
    if labels is not None and len(labels) != directions.shape[0]:
        raise ValueError(f"got {len(labels)} labels for {directions.shape[0]} directions")
    U = directions.to(first.device, dtype)
    settings = f"k={k} include_bias={include_bias} dtype={dtype} tol={tol}"
    tag = fingerprint([settings, U] + [t for w in weights.values() for t in _weight_tensors(w)])
    if shard_size is not None and shard_size < 1:
        raise FieldError("{shard_size}" + f" must be >= 1, got {shard_size}", ("shard_size",))
    index = {"fingerprint": tag, "layers": list(weights), "k": k, "d": d, "n_dirs": U.shape[0], "shard_size": shard_size,
             "dtype": str(dtype).removeprefix("torch."), "include_bias": include_bias, "tol": tol,
             "labels": None if labels is None else [int(x) for x in labels], "label_name": label_name}
    _check_directory_path(path)
    # One writer per atlas (rank 0 holds the lock for the whole build; a second build is
    # refused naming the holder), and dead writers' temporaries removed (output_locks).
    with claim_atlas_dir(path, writer=current_ranks().is_main):
        found = _check_out_dir(path, index, resume)
        index["shard_size"] = found["shard_size"] if found is not None else shard_size or DEFAULT_SHARD_SIZE
        shards = plan_shards(list(weights), U.shape[0], index["shard_size"])
        barrier()  # every rank has checked the directory before rank 0 writes to it
        if found is None and current_ranks().is_main:
            path.mkdir(parents=True, exist_ok=True)
            write_index(path, index)
        barrier()  # rank 0 wrote the index
        _compute_shards(path, weights, U, shards, k, include_bias, tol, route, tag, progress, index["labels"])
        barrier()
    return EigenAtlas(path)


def _compute_shards(
    path: Path, weights: dict[int, BilinearWeights], U: Tensor, shards: list[ShardSpec], k: int,
    include_bias: bool, tol: float, route: str, tag: str, progress: bool, labels: Optional[list[int]] = None,
) -> None:
    """Compute this rank's missing shards, layer by layer (``B`` built once per layer)."""
    ranks = current_ranks()
    n_dirs = U.shape[0]  # the route depends on the whole set, never on the rank count or resume state
    mine = [(i, s) for i, s in enumerate(shards) if ranks.owns(i) and not shard_is_done(path, s, tag)]
    n_mine = sum(ranks.owns(i) for i in range(len(shards)))
    bar = progress_bar(total=n_mine, initial=n_mine - len(mine), desc="eigen atlas", unit="shard",
                       enabled=progress and ranks.is_main)
    for layer, w in weights.items():
        todo = [(i, s) for i, s in mine if s.layer == layer]
        if not todo:
            continue
        chosen = choose_route(w, n_dirs, include_bias) if route == "auto" else route
        B = PackedSymmetricTensor.build(w, include_bias) if chosen == "dense_b" else None
        for i, spec in todo:
            tensors, exact_rows = _shard_tensors(w, U[spec.start : spec.stop], B, k, include_bias, tol, seed=i)
            write_shard(path, spec, tensors, tag, exact_rows, labels)
            bar.set_postfix(layer=layer, route=chosen)
            bar.update()
        del B
    bar.close()


def model_atlas(
    model: Any,
    out: Union[str, Path],
    tokens: Optional[Sequence[TokenLike]] = None,
    layers: Optional[Sequence[int]] = None,
    directions: Optional[Tensor] = None,
    labels: Optional[Sequence[int]] = None,
    label_name: str = "token",
    **kwargs: Any,
) -> EigenAtlas:
    """:func:`build_atlas` of a model's bilinear layers ``layers`` (all if ``None``; each
    checked to be a bilinear MLP) for a direction set: by default the output-token
    directions (through the final norm, :func:`~bilinear_lens.weights.directions.token_directions`)
    of ``tokens`` (ids or one-token strings; all of the vocabulary if ``None``), labelled by
    token id; or any ``directions [n_dirs, d_model]`` (e.g. SAE features) with their
    ``labels`` and ``label_name``. ``kwargs`` go to :func:`build_atlas`.
    """
    if directions is not None and tokens is not None:
        raise ValueError("give tokens or directions, not both")
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    mlps = {layer: bilinear_layer(model, layer) for layer in layers}
    if directions is None:
        ids = list(range(model.cfg.d_vocab)) if tokens is None else [token_id(model, t) for t in tokens]
        directions, labels, label_name = token_directions(model, ids), ids, "token"
    return build_atlas(mlps, directions, out, labels=labels, label_name=label_name, **kwargs)


def _weight_tensors(w: BilinearWeights) -> list[Tensor]:
    return [t for t in (w.W_in, w.W_gate, w.W_out, w.b_in, w.b_gate, w.b_out) if t is not None]


__all__ = ["ATLAS_CHUNK_BYTES", "ATLAS_MEMORY_BYTES", "DEFAULT_K", "DEFAULT_SHARD_SIZE", "INDEX_FIELDS", "KRYLOV_BATCH", "ROUTES", "build_atlas",
           "choose_route", "index_differences", "krylov_batch", "model_atlas"]
