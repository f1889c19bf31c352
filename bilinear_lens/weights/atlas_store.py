"""On-disk eigen atlas: a JSON index plus one safetensors shard per (layer, run of directions).

Layout of an atlas directory::

    index.json                       format, fingerprint, layers, k, d, n_dirs, labels, shards
    layer00-0000000/eigen.safetensors  eigenvalues [n, k], eigenvectors [n, d, k],
                                       frobenius_norm [n], captured_energy [n]
    layer00-0000000/shard.json         fingerprint, layer, start, stop, sha256 of the tensors

Each shard directory is written with :func:`~bilinear_lens.files.atomic.atomic_directory`,
so it exists complete or not at all; ``shard.json`` records the sha256 of its tensors, so a
shard truncated or replaced afterwards is detected. The ``fingerprint`` (sha256 of the
weights, the directions and the settings) is in the index and in every shard, so an atlas
never mixes shards of two models. :class:`EigenAtlas` reads one shard at a time, on demand.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.files.atomic import PathLike, atomic_directory
from bilinear_lens.files.names import ATLAS_INDEX_FILE as INDEX_FILE
from bilinear_lens.files.names import ATLAS_SHARD_RECORD as SHARD_RECORD
from bilinear_lens.files.names import ATLAS_SHARD_TENSORS as SHARD_TENSORS
from bilinear_lens.files.serialized import CheckpointError, read_json, read_tensors, write_json, write_tensors
from bilinear_lens.weights.eigen import Eigendecomposition, canonical_signs

FORMAT_NAME = "bilinear-lens-eigen-atlas"
FORMAT_VERSION = 1


class AtlasError(CheckpointError):
    """An atlas directory is incomplete, corrupt, or belongs to another model/setting."""


@dataclass(frozen=True)
class ShardSpec:
    """Directions ``[start, stop)`` of ``layer``, stored in directory ``name``."""

    layer: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"layer{self.layer:02d}-{self.start:07d}"


class AtlasEntry(NamedTuple):
    """Top-``k`` eigenpairs of one ``Q(u)`` with its Frobenius norm and captured energy."""

    eig: Eigendecomposition  # eigenvalues [k], eigenvectors [d, k], by |lambda| descending
    frobenius_norm: float  # ||Q(u)||_F
    captured_energy: float  # sum_{i<k} lambda_i^2 / ||Q(u)||_F^2


def fingerprint(parts: Iterable[Union[Tensor, str]]) -> str:
    """sha256 over tensors (their float64 values and shapes) and strings, in order."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Tensor):
            values = part.detach().to("cpu", torch.float64).contiguous()
            digest.update(repr(tuple(values.shape)).encode())
            digest.update(values.numpy().tobytes())
        else:
            digest.update(part.encode())
    return digest.hexdigest()


def plan_shards(layers: Sequence[int], n_dirs: int, shard_size: int) -> list[ShardSpec]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [ShardSpec(layer, start, min(start + shard_size, n_dirs)) for layer in layers for start in range(0, n_dirs, shard_size)]


def write_index(path: Path, index: dict[str, Any]) -> None:
    """Write ``index.json`` via a temporary file and a rename (never half-written)."""
    tmp = path / f".{INDEX_FILE}.tmp-{os.getpid()}"
    try:
        write_json(tmp, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **index})
        os.replace(tmp, path / INDEX_FILE)
    except BaseException:  # a full disk leaves no half-written temporary behind
        tmp.unlink(missing_ok=True)
        raise


def read_index(path: Path) -> dict[str, Any]:
    """The index of the atlas at ``path``; a missing, foreign or corrupt index raises :class:`AtlasError`."""
    try:
        index = read_json(path / INDEX_FILE, what="atlas index")
    except (FileNotFoundError, CheckpointError) as err:
        raise AtlasError(str(err)) from None
    if index.get("format") != FORMAT_NAME or index.get("format_version") != FORMAT_VERSION:
        raise AtlasError(f"{path / INDEX_FILE} is not a {FORMAT_NAME} v{FORMAT_VERSION} index")
    return index


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_shard(
    root: Path, spec: ShardSpec, tensors: dict[str, Tensor], fingerprint_: str, exact_rows: int,
    labels: Optional[Sequence[int]] = None,
) -> None:
    """Write one shard directory atomically: tensors, then the record with their sha256 and
    (``labels``: the whole atlas' row labels) the labels of its own rows, so a reader can
    tell an index whose labels were edited from the one the shard was written for."""
    with atomic_directory(root / spec.name) as tmp:
        write_tensors(tmp / SHARD_TENSORS, {k: v.cpu() for k, v in tensors.items()}, {"fingerprint": fingerprint_})
        record = {"fingerprint": fingerprint_, "layer": spec.layer, "start": spec.start, "stop": spec.stop,
                  "sha256": _sha256(tmp / SHARD_TENSORS), "exact_rows": exact_rows}
        if labels is not None:
            record["labels"] = [int(x) for x in labels[spec.start : spec.stop]]
        write_json(tmp / SHARD_RECORD, record)


def shard_is_done(root: Path, spec: ShardSpec, fingerprint_: str) -> bool:
    """Whether a valid, finished shard for ``spec`` exists (``False``: none yet).

    Raises :class:`AtlasError` for a shard directory that is half-written (record or
    tensors missing), corrupt (sha256 mismatch) or from another model (fingerprint).
    """
    directory = root / spec.name
    if not directory.exists():
        return False
    tensors, record_file = directory / SHARD_TENSORS, directory / SHARD_RECORD
    if not (tensors.is_file() and record_file.is_file()):
        raise AtlasError(f"shard {directory} is half-written (missing {SHARD_TENSORS} or {SHARD_RECORD}); delete it and resume")
    record = read_json(record_file, what="atlas shard record")
    if record.get("fingerprint") != fingerprint_:
        raise AtlasError(f"shard {directory} was made from another model or settings (fingerprint mismatch)")
    if (record.get("layer"), record.get("start"), record.get("stop")) != (spec.layer, spec.start, spec.stop):
        raise AtlasError(f"shard {directory} holds layer {record.get('layer')} rows {record.get('start')}:{record.get('stop')}, "
                         f"not layer {spec.layer} rows {spec.start}:{spec.stop} as the index's shard_size plans")
    if _sha256(tensors) != record.get("sha256"):
        raise AtlasError(f"shard {directory} is half-written or corrupt ({SHARD_TENSORS} does not match its sha256); delete it and resume")
    return True


def _is_count(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_index_fields(path: Path, index: dict[str, Any]) -> None:
    """:class:`AtlasError` (one line naming ``path/index.json``, the field and its value)
    unless the fields a reader relies on have their types and ranges: ``layers`` a
    non-empty list of distinct ints, ``k``, ``d``, ``n_dirs``, ``shard_size`` ints >= 1,
    ``fingerprint`` a string, ``labels`` null or ``n_dirs`` distinct ints."""
    where = path / INDEX_FILE

    def bad(field: str, why: str) -> AtlasError:
        value = index.get(field)
        shown = f"{value!r}" if not isinstance(value, list) or len(value) <= 8 else f"a list of {len(value)}"
        return AtlasError(f"atlas index {where}: {field} = {shown} {why}; the index was edited or damaged "
                          "(restore it or rebuild the atlas)")

    layers = index.get("layers")
    if not (isinstance(layers, list) and layers and all(_is_count(x, 0) for x in layers) and len(set(layers)) == len(layers)):
        raise bad("layers", "must be a non-empty list of distinct layer indices")
    for field in ("k", "d", "n_dirs", "shard_size"):
        if not _is_count(index.get(field), 1):
            raise bad(field, "must be an integer >= 1")
    if not isinstance(index.get("fingerprint"), str):
        raise bad("fingerprint", "must be a string")
    labels = index.get("labels")
    if labels is not None:
        if not (isinstance(labels, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in labels)):
            raise bad("labels", "must be null or a list of integers")
        if len(labels) != index["n_dirs"]:
            raise bad("labels", f"must hold n_dirs = {index['n_dirs']} labels, one per row, not {len(labels)}")
        if len(set(labels)) != len(labels):
            raise bad("labels", "must not repeat a label")


def check_shard_matches_index(path: Path, spec: ShardSpec, index: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """:class:`AtlasError` unless shard ``spec``'s tensors have the index' ``k`` and ``d``
    and its record's labels (atlases that record them) equal the index' labels of its rows."""
    directory = path / spec.name
    n = spec.stop - spec.start
    expected = {"eigenvalues": (n, index["k"]), "eigenvectors": (n, index["d"], index["k"]),
                "frobenius_norm": (n,), "captured_energy": (n,)}
    for name, shape in expected.items():
        found = tuple(tensors[name].shape) if name in tensors else None
        if found != shape:
            raise AtlasError(f"shard {directory} holds {name} of shape {found}, but {path / INDEX_FILE} "
                             f"(k = {index['k']}, d = {index['d']}) says {shape}; the index was edited or belongs to another atlas")
    recorded = read_json(directory / SHARD_RECORD, what="atlas shard record").get("labels")
    labels = index.get("labels")
    if recorded is not None and (labels is None or labels[spec.start : spec.stop] != recorded):
        shown = None if labels is None else labels[spec.start : spec.stop]
        raise AtlasError(f"{path / INDEX_FILE} labels rows {spec.start}:{spec.stop} as {_short(shown)}, but shard "
                         f"{directory} was written for labels {_short(recorded)}; the index was edited or belongs to another atlas")


def _short(values: Optional[list]) -> str:
    if values is None or len(values) <= 6:
        return str(values)
    return "[" + ", ".join(map(str, values[:3])) + f", ... ({len(values)} in all)]"


class EigenAtlas:
    """Read an atlas lazily: ``atlas.entry(layer, token=t)`` loads only the shard holding ``t``.

    ``labels`` (e.g. token ids) name the rows when the atlas was built with them; rows are
    ``0 .. n_dirs - 1`` otherwise. At most ``cache_shards`` shards stay in memory, and each
    is checked against its sha256 and fingerprint when first read. Eigenvectors are returned
    with the sign convention of :class:`~bilinear_lens.weights.eigen.Eigendecomposition`
    (also for atlases written before it: the loader re-applies it).
    """

    def __init__(self, path: PathLike, cache_shards: int = 4, device: Union[str, torch.device] = "cpu"):
        self.path = Path(path)
        self.index = read_index(self.path)
        check_index_fields(self.path, self.index)  # an edited index: one line, never a raw TypeError
        self.layers: list[int] = list(self.index["layers"])
        self.k: int = self.index["k"]
        self.n_dirs: int = self.index["n_dirs"]
        self.shard_size: int = self.index["shard_size"]
        labels = self.index.get("labels")
        self.labels: Optional[list[int]] = labels
        self._rows = {label: row for row, label in enumerate(labels)} if labels is not None else None
        self.device = torch.device(device)
        self.cache_shards = cache_shards
        self._cache: OrderedDict[ShardSpec, dict[str, Tensor]] = OrderedDict()

    def row(self, label: int) -> int:
        """The row of direction ``label`` (a row index when the atlas has no labels)."""
        if self._rows is None:
            if not 0 <= label < self.n_dirs:
                raise KeyError(f"row {label} is out of range [0, {self.n_dirs}) in atlas {self.path}")
            return label
        if label not in self._rows:
            raise KeyError(f"{self.index.get('label_name', 'label')} {label} is not in atlas {self.path}")
        return self._rows[label]

    def entry(self, layer: int, token: Optional[int] = None, row: Optional[int] = None) -> AtlasEntry:
        """Top-``k`` eigenpairs, ``||Q||_F`` and captured energy of one direction at ``layer``
        (give its label ``token`` or its ``row``)."""
        if (token is None) == (row is None):
            raise ValueError("give exactly one of token= or row=")
        row = self.row(token) if token is not None else row
        if not 0 <= row < self.n_dirs:
            raise KeyError(f"row {row} is out of range [0, {self.n_dirs}) in atlas {self.path}")
        tensors = self._shard(layer, row)
        i = row - (row // self.shard_size) * self.shard_size
        return AtlasEntry(
            Eigendecomposition(tensors["eigenvalues"][i], tensors["eigenvectors"][i]),
            float(tensors["frobenius_norm"][i]),
            float(tensors["captured_energy"][i]),
        )

    def top_eigenvectors(self, layer: int, token: int) -> Eigendecomposition:
        """The top-``k`` eigenpairs of ``Q(u_token)`` at ``layer`` (``[k]``, ``[d, k]``)."""
        return self.entry(layer, token=token).eig

    def layer_tensors(self, layer: int, name: str) -> Float[Tensor, "n_dirs ..."]:
        """One stored tensor for every direction of ``layer`` (reads all its shards)."""
        self._check_layer(layer)
        starts = range(0, self.n_dirs, self.shard_size)
        return torch.cat([self._shard(layer, start)[name] for start in starts])

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not in atlas {self.path} (layers {self.layers})")

    def _shard(self, layer: int, row: int) -> dict[str, Tensor]:
        self._check_layer(layer)
        start = (row // self.shard_size) * self.shard_size
        spec = ShardSpec(layer, start, min(start + self.shard_size, self.n_dirs))
        if spec not in self._cache:
            if not shard_is_done(self.path, spec, self.index["fingerprint"]):
                raise AtlasError(f"atlas {self.path} is incomplete: shard {spec.name} is missing; resume building it")
            tensors = read_tensors(self.path / spec.name / SHARD_TENSORS, self.device, what="atlas shard")
            check_shard_matches_index(self.path, spec, self.index, tensors)
            # Written with the sign convention already; re-applied (idempotent, O(n d k)) so that
            # atlases written before it existed read the same as new ones.
            tensors["eigenvectors"] = canonical_signs(tensors["eigenvectors"])
            self._cache[spec] = tensors
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
        self._cache.move_to_end(spec)
        return self._cache[spec]


__all__ = ["AtlasEntry", "AtlasError", "EigenAtlas", "ShardSpec", "check_index_fields", "check_shard_matches_index",
           "fingerprint", "plan_shards", "read_index"]
