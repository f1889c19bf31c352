"""Training data: load documents, tokenize them once into a memory-mapped cache, serve blocks.

Pipeline (:func:`prepare_data` runs all of it)::

    source ──iter_texts──> documents ──is_val_document──> train / val documents
           ──encode_documents──> uint16 token stream  [SEP, doc0..., SEP, doc1..., ...]
           ──write (atomic) ──> <cache_dir>/<key>.{train,val}.bin + .json sidecars
           ──TokenBlocks──> blocks [n_blocks, n_ctx + 1]; input = block[:-1], target = block[1:]

Sources (:func:`iter_texts`):

- ``"synthetic"``: the built-in story generator (:mod:`bilinear_lens.data.synthetic`);
- a local file: ``.txt`` (documents found by an explicit rule, :mod:`bilinear_lens.data.documents`;
  by default ``<|endoftext|>`` lines when the file has them, else the whole file as one
  document whose tail is the validation split), or, read through ``datasets``, ``.jsonl`` /
  ``.json`` (a text field, one document per row) or ``.parquet`` (a text column);
- otherwise a Hugging Face hub dataset name, e.g. ``"roneneldan/TinyStories"``.

The validation split is chosen per document by a seeded hash of its text, so it is
deterministic, independent of corpus order and size limits, and duplicate documents (which
TinyStories has) never straddle train and val. A text file that is one document (rule
``"file"``) is split once, at a paragraph boundary: its last ``val_fraction`` is val.

The token cache is keyed by a hash of the source spec (for a local file: its path, size
and mtime) and the tokenizer, so a later run with the same inputs memory-maps the files
instead of tokenizing again. Files are written to temporaries and renamed into place, with
the JSON sidecars written last, so an interrupted run never leaves a cache that looks valid;
a lock file per cache entry lets one process write it while others wait, and the
temporaries of killed writers are removed on the next call.

Batches (:meth:`TokenBlocks.batch`) are a pure function of ``(step, batch_size, rank,
world_size, seed)``: resuming at step ``k`` needs only ``k``, and the ranks of one step get
disjoint blocks whose concatenation is the single-process batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from bilinear_lens.progress import progress_bar
from bilinear_lens.data.documents import ENDOFTEXT, check_document_rule, split_text, tail_split
from bilinear_lens.data.fingerprint import FileFingerprint, fingerprint_file
from bilinear_lens.data.synthetic import iter_synthetic_stories
from bilinear_lens.locking import exclusive_lock
from bilinear_lens.files.atomic import atomic_write_text, remove_stale_temporaries
from bilinear_lens.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    SEPARATOR_ID,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

__all__ = [
    "SYNTHETIC_SOURCE",
    "SYNTHETIC_DEFAULT_DOCS",
    "SUPPORTED_EXTENSIONS",
    "TOKEN_DTYPE",
    "iter_texts",
    "load_texts",
    "is_val_document",
    "resolved_source",
    "corpus_fingerprint",
    "split_documents",
    "assign_splits",
    "CorpusUnavailableError",
    "check_hub_reachable",
    "text_file_rule",
    "encode_documents",
    "pack_blocks",
    "source_spec",
    "token_cache_key",
    "build_token_cache",
    "open_token_file",
    "TokenBlocks",
    "prepare_data",
]

SYNTHETIC_SOURCE = "synthetic"
# Stories drawn from the synthetic source when neither max_docs nor max_chars is given
# (about 100k stories, ~20M characters, ~5M tokens).
SYNTHETIC_DEFAULT_DOCS = 100_000
# extension -> (datasets builder, extra builder kwargs)
SUPPORTED_EXTENSIONS: dict[str, tuple[str, dict[str, Any]]] = {
    ".txt": ("", {}),  # read by this module: documents by an explicit rule (data.documents)
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}
TOKEN_DTYPE = np.uint16
_MAX_TOKEN_ID = int(np.iinfo(TOKEN_DTYPE).max)
_CACHE_FORMAT_VERSION = 1
_ENCODE_BATCH_DOCS = 1024


# --- loading documents ------------------------------------------------------------------


def is_local_source(source: str) -> bool:
    """A source names a local file if it exists, is explicitly a path, or has a file
    extension; anything else (``"owner/name"``) is a hub dataset."""
    path = Path(source).expanduser()
    return (
        path.exists()
        or path.is_absolute()
        or source.startswith((".", "~"))
        or path.suffix != ""
    )


def resolved_source(source: str) -> str:
    """``source`` as a recipe records it: a local file as its absolute resolved path (a
    relative path is resolved against the working directory, once, when training starts, so
    a later reader from another directory finds the same file); ``"synthetic"`` and hub
    dataset names unchanged."""
    if source == SYNTHETIC_SOURCE or not is_local_source(source):
        return source
    return str(Path(source).expanduser().resolve())


def _missing_corpus(path: Path) -> FileNotFoundError:
    """The one message for a local corpus that is not there, with the override that fixes it."""
    return FileNotFoundError(f"corpus file not found: {path} (data.source); give the corpus path with "
                             "--set data.source=path/to/stories.txt (relative paths are from the working directory)")


def _check_corpus_file(path: Path) -> None:
    """A local corpus must exist (else the message naming ``data.source``) and be a file."""
    if not path.exists():
        raise _missing_corpus(path)
    if not path.is_file():
        raise ValueError(f"corpus path is not a file: {path}")


def _local_dataset(path: Path, split: str, hf_cache_dir: Optional[str]) -> Any:
    _check_corpus_file(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"unsupported corpus file extension {suffix!r} for {path}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    import datasets

    builder, kwargs = SUPPORTED_EXTENSIONS[suffix]
    # Streaming reads the file in place: no Arrow copy in the HF cache for a one-pass read.
    return datasets.load_dataset(
        builder, data_files={split: str(path)}, split=split, streaming=True, cache_dir=hf_cache_dir, **kwargs
    )


def _not_utf8(path: Path, err: UnicodeDecodeError) -> ValueError:
    bad = err.object[err.start:err.start + 1]
    return ValueError(f"corpus file {path} (data.source) is not UTF-8 text ({err.reason}: byte {bad!r}); "
                      "convert it to UTF-8")


def _read_text_file(path: Path) -> str:
    """The UTF-8 text of the local corpus file ``path`` (a ``ValueError`` naming the file and
    the ``data.source`` field when it is not UTF-8)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def text_file_rule(source: str | os.PathLike[str], documents: str = "auto") -> Optional[str]:
    """The concrete document rule (:func:`bilinear_lens.data.documents.resolve_document_rule`)
    for a local ``.txt`` source, ``None`` for any other source. ``"auto"`` scans the file
    line by line for an ``<|endoftext|>`` line, without reading it whole."""
    source = os.fspath(source)
    check_document_rule(documents, "documents (data.documents)")
    if not _is_text_file(source):
        return None
    if documents != "auto":
        return documents
    path = Path(source).expanduser()
    if not path.is_file():
        raise _missing_corpus(path)
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:  # the marker alone on its line, as split_text's rule
                if line.strip(" \t\r\n") == ENDOFTEXT:
                    return "endoftext"
        return "file"
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def _is_text_file(source: str) -> bool:
    return source != SYNTHETIC_SOURCE and is_local_source(source) and Path(source).suffix.lower() == ".txt"


def _text_file_documents(path: Path, documents: str) -> list[str]:
    _check_corpus_file(path)
    return split_text(_read_text_file(path), documents)


class CorpusUnavailableError(ValueError):
    """A hub dataset that cannot be read here (no network, offline mode without a cached
    copy): one line naming the dataset, the cause and the local-file route."""


HUB_PROBE_SECONDS = 3.0  # one TCP connect to the hub endpoint before datasets' retry loop
_LOCAL_ROUTE = "train on a local file instead: --set data.source=path/to/stories.txt (.txt, .jsonl or .parquet)"


def _offline_mode() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or flag


def check_hub_reachable(name: str, timeout: float = HUB_PROBE_SECONDS) -> None:
    """Fail fast, in one line, when the hub endpoint cannot be reached: ``datasets`` would
    otherwise retry for ~30 s, printing each attempt. Offline mode (``HF_HUB_OFFLINE`` /
    ``HF_DATASETS_OFFLINE``) skips the probe: the cache is read instead."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if _offline_mode():
        return
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise CorpusUnavailableError(
            f"cannot reach the Hugging Face hub ({host}:{port}: {err.strerror or err}) to load dataset {name!r} "
            f"(data.source); set HF_DATASETS_OFFLINE=1 to read a cached copy, or {_LOCAL_ROUTE}") from None


def _hub_dataset(name: str, split: str, streaming: bool, hf_cache_dir: Optional[str]) -> Any:
    import datasets

    check_hub_reachable(name)
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming, cache_dir=hf_cache_dir)
    except Exception as err:  # offline, unknown name, network: a data error (exit 2), one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if _offline_mode() and isinstance(err, (ConnectionError, FileNotFoundError)):
            raise CorpusUnavailableError(
                f"dataset {name!r} (data.source) is not in the cache and offline mode is on ({reason}); "
                f"{_LOCAL_ROUTE}") from None
        raise CorpusUnavailableError(f"corpus {name!r} is not a local file and the hub dataset cannot be loaded "
                                     f"(split {split!r}): {type(err).__name__}: {reason}") from None


def _dataset_texts(dataset: Any, text_column: str, source: str) -> Iterator[str]:
    columns = getattr(dataset, "column_names", None)  # None for some streaming datasets
    if columns is not None and text_column not in columns:
        raise ValueError(f"no text column {text_column!r} in {source}; columns: {list(columns)}")
    for row in dataset:
        if text_column not in row:
            raise ValueError(f"no text column {text_column!r} in {source}; columns: {list(row)}")
        yield row[text_column]


def _utf8_texts(texts: Iterator[str], path: Path) -> Iterator[str]:
    """``texts`` of the local file ``path``; its decoding failing (not UTF-8) is a
    ``ValueError`` naming the file and the ``data.source`` field (the recipe's name for it)."""
    try:
        yield from texts
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def iter_texts(
    source: str | os.PathLike[str],
    split: str = "train",
    *,
    max_docs: Optional[int] = None,
    max_chars: Optional[int] = None,
    text_column: str = "text",
    seed: int = 0,
    streaming: bool = False,
    hf_cache_dir: Optional[str] = None,
    documents: str = "auto",
) -> Iterator[str]:
    """Stream the documents of ``source``, stripped of surrounding whitespace, empty ones
    dropped.

    Args:
        source: ``"synthetic"``, a local ``.txt``/``.jsonl``/``.json``/``.parquet`` file, or
            a hub dataset name (loaded with ``datasets.load_dataset(name, split=split,
            streaming=streaming)``).
        split: dataset split. Local files have a single split, named ``split``. For
            ``"synthetic"``, ``"train"`` uses ``seed`` and any other split an independent
            seed derived from ``seed`` and the split name.
        max_docs: stop after this many documents. The synthetic source is endless, so it
            yields :data:`SYNTHETIC_DEFAULT_DOCS` when neither limit is given.
        max_chars: stop once the documents yielded hold at least this many characters (the
            document crossing the limit is included).
        text_column: column (field) holding the text.
        seed: synthetic generator seed (ignored for other sources).
        streaming: stream a hub dataset instead of downloading it. Local files are always
            streamed (read in place).
        hf_cache_dir: ``datasets`` cache directory (default: HF's); hub downloads go
            there, local files leave only lock files.
        documents: where a document ends in a local ``.txt`` file (one of
            :data:`bilinear_lens.data.documents.DOCUMENT_RULES`; ignored for other sources).

    Raises ``FileNotFoundError`` (missing local file), ``ValueError`` (unsupported
    extension, missing text column, bad limits, a local file that is not UTF-8). An empty corpus yields nothing; see
    :func:`load_texts` for the check.
    """
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"max_docs must be >= 1 or None, got {max_docs}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be >= 1 or None, got {max_chars}")
    source = os.fspath(source)
    check_document_rule(documents, "documents (data.documents)")
    raw: Iterator[str]
    if _is_text_file(source):
        raw = iter(_text_file_documents(Path(source).expanduser(), documents))
    elif source == SYNTHETIC_SOURCE:
        raw = iter_synthetic_stories(seed if split == "train" else f"{seed}:{split}")
        if max_docs is None and max_chars is None:
            max_docs = SYNTHETIC_DEFAULT_DOCS
    elif is_local_source(source):
        path = Path(source).expanduser()
        raw = _utf8_texts(_dataset_texts(_local_dataset(path, split, hf_cache_dir), text_column, str(path)), path)
    else:
        raw = _dataset_texts(_hub_dataset(source, split, streaming, hf_cache_dir), text_column, source)

    n_docs = n_chars = 0
    for text in raw:
        text = text.strip() if text else ""
        if not text:
            continue
        yield text
        n_docs += 1
        n_chars += len(text)
        if (max_docs is not None and n_docs >= max_docs) or (max_chars is not None and n_chars >= max_chars):
            return


def load_texts(source: str | os.PathLike[str], split: str = "train", **options: Any) -> list[str]:
    """All documents of ``source`` as a list; ``options`` are :func:`iter_texts`' keyword
    arguments (``max_docs``, ``max_chars``, ``text_column``, ``seed``, ``streaming``,
    ``hf_cache_dir``, ``documents``).

    Raises ``ValueError`` naming the source if it holds no non-empty document.
    """
    texts = list(iter_texts(source, split, **options))
    if not texts:
        raise ValueError(f"empty corpus: {os.fspath(source)!r} (split {split!r}) has no non-empty documents")
    return texts


# --- train / validation split ------------------------------------------------------------


def is_val_document(text: str, val_fraction: float, seed: int = 0) -> bool:
    """Whether ``text`` belongs to the validation split: a seeded hash of the text, mapped
    to [0, 1), is below ``val_fraction``. Identical texts always land in the same split."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def split_documents(texts: Iterable[str], val_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """``(train, val)`` document lists by :func:`is_val_document`, order kept."""
    _check_val_fraction(val_fraction)
    train: list[str] = []
    val: list[str] = []
    for text in texts:
        (val if is_val_document(text, val_fraction, seed) else train).append(text)
    return train, val


def assign_splits(
    texts: Iterable[str], val_fraction: float, seed: int = 0, whole_file: bool = False
) -> Iterator[tuple[str, str]]:
    """``(split, document)`` pairs: by :func:`is_val_document`, or with ``whole_file`` (a
    text file read with the ``"file"`` rule: one document) its head for ``"train"`` and its
    tail for ``"val"`` (:func:`bilinear_lens.data.documents.tail_split`)."""
    for text in texts:
        if whole_file:
            head, tail = tail_split(text, val_fraction)
            yield "train", head
            if tail:
                yield "val", tail
        else:
            yield ("val" if is_val_document(text, val_fraction, seed) else "train"), text


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")


# --- tokenizing and packing ---------------------------------------------------------------


def _check_vocab_fits(tokenizer: Tokenizer) -> None:
    vocab_size = tokenizer.get_vocab_size()
    if vocab_size > _MAX_TOKEN_ID + 1:
        raise ValueError(
            f"vocab size {vocab_size} does not fit the uint16 token files (max {_MAX_TOKEN_ID + 1}); "
            "use a smaller vocab_size"
        )


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Token stream of ``texts``, each document preceded by the separator (BOS) token.

    Returns a uint16 array ``[sum(len(doc) + 1)]``: ``[SEP, doc0..., SEP, doc1..., ...]``.
    """
    _check_vocab_fits(tokenizer)
    ids = [enc.ids for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    count = sum(len(doc) for doc in ids) + len(ids)
    stream = chain.from_iterable(chain.from_iterable(([SEPARATOR_ID], doc) for doc in ids))
    return np.fromiter(stream, dtype=TOKEN_DTYPE, count=count)


def pack_blocks(tokens: np.ndarray, n_ctx: int, name: str = "token") -> np.ndarray:
    """View a token stream ``[n_tokens]`` as non-overlapping blocks ``[n_blocks, n_ctx + 1]``
    (the tail shorter than a block is dropped); no copy, so it works on a memmap.

    Raises ``ValueError`` naming ``n_ctx`` and the token count if not even one block fits.
    """
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
    if tokens.ndim != 1:
        raise ValueError(f"expected a 1-D token stream, got shape {tokens.shape}")
    block_len = n_ctx + 1
    n_blocks = len(tokens) // block_len
    if n_blocks == 0:
        raise ValueError(
            f"n_ctx={n_ctx} is too large for the {name} split: a block needs {block_len} tokens "
            f"but the split has only {len(tokens)} tokens; use a smaller n_ctx or more data"
        )
    return tokens[: n_blocks * block_len].reshape(n_blocks, block_len)


# --- token cache ------------------------------------------------------------------------


def source_spec(source: str | os.PathLike[str], split: str, selection: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-able description of a corpus, precise enough to key a cache on: ``selection``
    holds :func:`iter_texts`' ``max_docs``, ``max_chars``, ``text_column``, ``seed`` and
    ``documents`` (a ``.txt`` file's spec records its concrete document rule); a
    local file is identified by its resolved path, size and modification time (an edit
    invalidates)."""
    max_docs, max_chars = selection.get("max_docs"), selection.get("max_chars")
    text_column, seed = selection.get("text_column", "text"), selection.get("seed", 0)
    source = os.fspath(source)
    spec: dict[str, Any] = {
        "source": source, "split": split, "max_docs": max_docs, "max_chars": max_chars,
    }
    if source == SYNTHETIC_SOURCE:
        spec["seed"] = seed
    elif is_local_source(source):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise _missing_corpus(path)
        stat = path.stat()
        spec.update(source=str(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns, text_column=text_column)
        if path.suffix.lower() == ".txt":  # the document rule decides what is packed and held out
            spec["documents"] = text_file_rule(path, selection.get("documents", "auto"))
    else:
        spec["text_column"] = text_column
    return spec


def token_cache_key(spec: dict[str, Any], tokenizer_sha256: str, val_fraction: float, seed: int) -> str:
    """Hex key of a token cache: hash of the source spec, the tokenizer and the split."""
    payload = json.dumps(
        {"format": _CACHE_FORMAT_VERSION, "spec": spec, "tokenizer": tokenizer_sha256,
         "val_fraction": val_fraction, "split_seed": seed},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:24]


def _cache_paths(cache_dir: Path, key: str, split: str) -> tuple[Path, Path]:
    return cache_dir / f"{key}.{split}.bin", cache_dir / f"{key}.{split}.json"


def _stream_tokens(
    pairs: Iterable[tuple[str, str]], tokenizer: Tokenizer, files: dict[str, Any]
) -> dict[str, dict[str, int]]:
    """Append each ``(split, document)``'s tokens to its split's file (``files[split]``),
    encoding in batches of :data:`_ENCODE_BATCH_DOCS`; returns ``{split: {token_count, n_docs}}``."""
    counts = {s: {"token_count": 0, "n_docs": 0} for s in files}
    pending: dict[str, list[str]] = {s: [] for s in files}

    def flush(split: str) -> None:
        tokens = encode_documents(tokenizer, pending[split])
        files[split].write(tokens.tobytes())
        counts[split]["token_count"] += len(tokens)
        counts[split]["n_docs"] += len(pending[split])
        pending[split].clear()

    for split, text in pairs:
        pending[split].append(text)
        if len(pending[split]) >= _ENCODE_BATCH_DOCS:
            flush(split)
    for split in files:
        if pending[split]:
            flush(split)
    return counts


def build_token_cache(
    texts: Iterable[str],
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike[str],
    key: str,
    *,
    val_fraction: float,
    seed: int = 0,
    description: Optional[dict[str, Any]] = None,
    progress: bool = False,
    whole_file: bool = False,
) -> dict[str, Path]:
    """Tokenize ``texts`` in one streaming pass into ``<cache_dir>/<key>.{train,val}.bin``.

    Each document goes to train or val by :func:`assign_splits` (a seeded hash; with
    ``whole_file`` the one document's head and tail); each split's file is
    its :func:`encode_documents` stream (uint16, native byte order), with a JSON sidecar
    (``token_count``, ``n_docs``, ``vocab_size``, ``tokenizer_sha256``, ``source``...).
    Binaries are renamed into place first and sidecars last, so a sidecar implies a
    complete binary. Returns ``{"train": path, "val": path}`` (no val without val_fraction).

    Raises ``ValueError`` if ``texts`` is empty (nothing is written).
    """
    _check_val_fraction(val_fraction)
    _check_vocab_fits(tokenizer)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    splits = ["train", "val"] if val_fraction > 0 else ["train"]
    tmp_paths = {s: cache_dir / f"{key}.{s}.bin.tmp-{os.getpid()}" for s in splits}
    files = {s: open(tmp_paths[s], "wb") for s in splits}
    try:
        # progress counts the source's documents (a whole file is one, though its head and tail
        # go to train and val as two pieces: the bar said "2 doc" for a one-document file)
        documents = progress_bar(texts, desc="tokenizing", unit="doc", enabled=progress)
        pairs = assign_splits(documents, val_fraction, seed, whole_file)
        counts = _stream_tokens(((s, t) for s, t in pairs if s in files), tokenizer, files)
        for f in files.values():
            f.close()
        if sum(c["n_docs"] for c in counts.values()) == 0:
            name = (description or {}).get("source", "corpus")
            raise ValueError(f"empty corpus: {name!r} has no non-empty documents")
        meta_common = {
            "format_version": _CACHE_FORMAT_VERSION, "dtype": np.dtype(TOKEN_DTYPE).name,
            "separator_id": SEPARATOR_ID, "vocab_size": tokenizer.get_vocab_size(),
            "tokenizer_sha256": tokenizer_hash(tokenizer), "source": description or {},
            "val_fraction": val_fraction, "split_seed": seed,
        }
        out: dict[str, Path] = {}
        for split in splits:
            bin_path, _ = _cache_paths(cache_dir, key, split)
            os.replace(tmp_paths[split], bin_path)
            out[split] = bin_path
        for split in reversed(splits):  # train's sidecar last: it marks the cache complete
            atomic_write_text(_cache_paths(cache_dir, key, split)[1],
                              json.dumps({**meta_common, "split": split, **counts[split]}, indent=2, sort_keys=True))
        return out
    finally:
        for f in files.values():
            f.close()
        for tmp in tmp_paths.values():
            tmp.unlink(missing_ok=True)


def _read_sidecar(bin_path: Path) -> dict[str, Any]:
    sidecar = bin_path.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"token file sidecar not found: {sidecar}")
    return json.loads(sidecar.read_text())


def open_token_file(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a cached token file read-only: uint16 ``[token_count]``.

    Checks the sidecar's ``token_count`` against the file size (``ValueError`` if not).
    """
    path = Path(path)
    meta = _read_sidecar(path)
    expected = meta["token_count"] * np.dtype(meta["dtype"]).itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise ValueError(f"token file {path} is missing or truncated (expected {expected} bytes)")
    if meta["token_count"] == 0:  # np.memmap refuses empty files
        return np.zeros(0, dtype=meta["dtype"])
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["token_count"],))


def _cache_is_valid(cache_dir: Path, key: str, splits: Sequence[str], tokenizer_sha256: str) -> bool:
    for split in splits:
        bin_path, sidecar = _cache_paths(cache_dir, key, split)
        try:
            meta = json.loads(sidecar.read_text())
            ok = (
                meta.get("format_version") == _CACHE_FORMAT_VERSION
                and meta.get("tokenizer_sha256") == tokenizer_sha256
                and bin_path.stat().st_size == meta["token_count"] * np.dtype(meta["dtype"]).itemsize
            )
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if not ok:
            return False
    return True


# --- blocks and batches -------------------------------------------------------------------


class TokenBlocks:
    """A token stream cut into blocks ``[n_blocks, n_ctx + 1]``, served as deterministic
    batches.

    Training order: epoch ``e`` visits the blocks in the permutation
    ``default_rng([seed, e]).permutation(n_blocks)``, in global batches of ``batch_size``
    blocks (the last partial batch of each epoch is dropped, so no batch repeats a block).
    Step ``s`` is batch ``s % batches_per_epoch`` of epoch ``s // batches_per_epoch``, and
    rank ``r`` of ``world_size`` takes rows ``[r * b, (r + 1) * b)`` of it with
    ``b = batch_size // world_size``.

    Args:
        tokens: 1-D integer token stream (a memmap from :func:`open_token_file` is not
            copied).
        n_ctx: context length; blocks hold ``n_ctx + 1`` tokens (input and shifted target).
        name: split name for error messages.
    """

    def __init__(self, tokens: np.ndarray, n_ctx: int, name: str = "train") -> None:
        self.tokens = tokens
        self.n_ctx = n_ctx
        self.name = name
        self.blocks = pack_blocks(tokens, n_ctx, name)
        self.path: Optional[Path] = None
        self.meta: dict[str, Any] = {}  # the cache sidecar (n_docs, source, ...) when read from a file
        self._perm_cache: tuple[tuple[int, int], np.ndarray] | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], n_ctx: int, name: Optional[str] = None) -> "TokenBlocks":
        """Blocks over a cached token file (memory-mapped, read-only)."""
        meta = _read_sidecar(Path(path))
        blocks = cls(open_token_file(path), n_ctx, name or meta.get("split", "train"))
        blocks.path = Path(path)
        blocks.meta = meta
        return blocks

    @property
    def n_blocks(self) -> int:
        return int(self.blocks.shape[0])

    @property
    def n_tokens(self) -> int:
        """Tokens in the stream (including the dropped tail)."""
        return int(len(self.tokens))

    def __len__(self) -> int:
        return self.n_blocks

    def __getitem__(self, index: int) -> Tensor:
        """Block ``index``: LongTensor ``[n_ctx + 1]``."""
        return torch.from_numpy(self.blocks[index].astype(np.int64))

    def __repr__(self) -> str:
        return f"TokenBlocks(name={self.name!r}, n_blocks={self.n_blocks}, n_ctx={self.n_ctx}, n_tokens={self.n_tokens})"

    def _check_batch_args(self, batch_size: int, rank: int, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size must be a positive multiple of world_size={world_size}, got {batch_size}")

    def batches_per_epoch(self, batch_size: int) -> int:
        """Full global batches per epoch: ``n_blocks // batch_size``."""
        if batch_size > self.n_blocks:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {self.n_blocks} blocks of n_ctx={self.n_ctx} "
                f"in the {self.name} split; use a smaller batch_size or n_ctx, or more data"
            )
        return self.n_blocks // batch_size

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != (seed, epoch):
            self._perm_cache = ((seed, epoch), np.random.default_rng([seed, epoch]).permutation(self.n_blocks))
        return self._perm_cache[1]

    def block_indices(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> np.ndarray:
        """Indices of the blocks of ``step`` for ``rank``: int64 ``[batch_size // world_size]``."""
        self._check_batch_args(batch_size, rank, world_size)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        per_epoch = self.batches_per_epoch(batch_size)
        epoch, within = divmod(step, per_epoch)
        per_rank = batch_size // world_size
        start = within * batch_size + rank * per_rank
        return self._permutation(seed, epoch)[start : start + per_rank]

    def epoch(self, step: int, batch_size: int) -> int:
        """The epoch that ``step`` falls in."""
        return step // self.batches_per_epoch(batch_size)

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> Tensor:
        """Training batch of ``step`` for ``rank``: LongTensor ``[batch_size // world_size, n_ctx + 1]``.

        ``batch_size`` is the global batch size (a multiple of ``world_size``); input is
        ``batch[:, :-1]``, target ``batch[:, 1:]``.
        """
        indices = self.block_indices(step, batch_size, rank, world_size, seed)
        return torch.from_numpy(self.blocks[indices].astype(np.int64))

    def eval_batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[Tensor]:
        """All blocks in file order, as LongTensors ``[<= batch_size, n_ctx + 1]`` (the last
        batch may be short); rank ``r`` gets batches ``r, r + world_size, ...``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        for start in range(rank * batch_size, self.n_blocks, batch_size * world_size):
            yield torch.from_numpy(self.blocks[start : start + batch_size].astype(np.int64))


# --- entry point --------------------------------------------------------------------------


def _check_prepare_args(n_ctx: int, val_fraction: float, seed: int, tokenizer_train_docs: Optional[int]) -> None:
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
    _check_val_fraction(val_fraction)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if tokenizer_train_docs is not None and tokenizer_train_docs < 1:
        raise ValueError(f"tokenizer_train_docs must be >= 1 or None, got {tokenizer_train_docs}")


def prepare_data(
    source: str | os.PathLike[str] = SYNTHETIC_SOURCE,
    tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    n_ctx: int = 256,
    cache_dir: str | os.PathLike[str] = "data_cache",
    val_fraction: float = 0.05,
    seed: int = 0,
    max_docs: Optional[int] = None,
    *,
    split: str = "train",
    max_chars: Optional[int] = None,
    text_column: str = "text",
    streaming: bool = False,
    tokenizer_train_docs: Optional[int] = 100_000,
    hf_cache_dir: Optional[str] = None,
    progress: bool = False,
    documents: str = "auto",
) -> tuple[Tokenizer, TokenBlocks, Optional[TokenBlocks]]:
    """Tokenizer, train blocks and validation blocks for ``source``, cached in ``cache_dir``.

    Args:
        source, split, max_docs, max_chars, text_column, streaming, hf_cache_dir, documents:
            the corpus, as in :func:`iter_texts` (``seed`` also seeds the synthetic source).
        tokenizer: a ``Tokenizer``, a path to a ``tokenizer.json``, or ``None`` to train a
            byte-level BPE of ``vocab_size`` on the first ``tokenizer_train_docs`` training
            documents (``None``: all); the trained tokenizer is cached in ``cache_dir`` too.
        vocab_size: requested vocabulary size when training (the result may be smaller
            on a small corpus; read ``tokenizer.get_vocab_size()``).
        n_ctx: context length; blocks are ``[n_ctx + 1]`` tokens.
        val_fraction: fraction of documents held out for validation (0: no val split).
        seed: seeds the synthetic corpus and the train/val split (the batch order has its
            own seed, passed to :meth:`TokenBlocks.batch`).

    Returns ``(tokenizer, train_blocks, val_blocks)``; ``val_blocks`` is ``None`` when
    ``val_fraction == 0``. A second call with the same arguments reads only the cache.

    Raises ``ValueError`` for bad parameters, an empty corpus, or an ``n_ctx`` too large to
    fill one block of either split (the message names ``n_ctx`` and the token count).
    """
    _check_prepare_args(n_ctx, val_fraction, seed, tokenizer_train_docs)
    cache_dir = Path(cache_dir)
    selection = dict(max_docs=max_docs, max_chars=max_chars, text_column=text_column, seed=seed, documents=documents)
    spec = source_spec(source, split, selection)
    whole_file = spec.get("documents") == "file"
    remove_stale_temporaries(cache_dir)

    def texts() -> Iterator[str]:
        return iter_texts(source, split, streaming=streaming, hf_cache_dir=hf_cache_dir, **selection)

    if tokenizer is None:
        tok = _cached_tokenizer(texts, spec, cache_dir, vocab_size, tokenizer_train_docs, val_fraction, seed, progress,
                                whole_file)
    elif isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = load_tokenizer(tokenizer)
    _check_vocab_fits(tok)

    tok_sha = tokenizer_hash(tok)
    key = token_cache_key(spec, tok_sha, val_fraction, seed)
    splits = ["train", "val"] if val_fraction > 0 else ["train"]
    # One writer per cache entry: a second process waits, then finds the cache complete.
    with exclusive_lock(cache_dir / f"{key}.lock", what=f"token cache {key}", wait=True):
        if not _cache_is_valid(cache_dir, key, splits, tok_sha):
            # a local file's SHA-256, hashed once here: the cache sidecar keeps it (corpus_fingerprint)
            local = "mtime_ns" in spec
            description = {**spec, "sha256": fingerprint_file(spec["source"]).sha256} if local else spec
            build_token_cache(
                texts(), tok, cache_dir, key, val_fraction=val_fraction, seed=seed,
                description=description, progress=progress, whole_file=whole_file,
            )
    train_blocks = TokenBlocks.from_file(_cache_paths(cache_dir, key, "train")[0], n_ctx, "train")
    val_blocks = (
        TokenBlocks.from_file(_cache_paths(cache_dir, key, "val")[0], n_ctx, "val") if val_fraction > 0 else None
    )
    return tok, train_blocks, val_blocks


def corpus_fingerprint(blocks: TokenBlocks) -> Optional[FileFingerprint]:
    """The fingerprint (:mod:`bilinear_lens.data.fingerprint`) of the local file whose tokens
    ``blocks`` (read from a :func:`prepare_data` cache) hold, ``None`` for the synthetic or a
    hub source. Read from the cache sidecar; a cache written before sidecars kept the hash
    has the file hashed now."""
    spec = blocks.meta.get("source") or {}
    if "mtime_ns" not in spec:  # only a local file's spec records its size and mtime
        return None
    if "sha256" not in spec:
        return fingerprint_file(spec["source"])
    return FileFingerprint(str(spec["source"]), int(spec["size"]), str(spec["sha256"]), int(spec["mtime_ns"]))


def _cached_tokenizer(
    texts: Callable[[], Iterator[str]], spec: dict[str, Any], cache_dir: Path, vocab_size: int,
    train_docs: Optional[int], val_fraction: float, seed: int, progress: bool, whole_file: bool = False,
) -> Tokenizer:
    """The BPE trained on the first ``train_docs`` training documents of ``texts()``,
    read from ``cache_dir`` if an earlier call trained it (one trainer at a time)."""
    tok_key = hashlib.sha256(
        json.dumps({"spec": spec, "vocab_size": vocab_size, "train_docs": train_docs,
                    "val_fraction": val_fraction, "seed": seed}, sort_keys=True).encode()
    ).hexdigest()[:24]
    tok_path = cache_dir / f"tokenizer-{tok_key}.json"
    with exclusive_lock(tok_path.with_suffix(".lock"), what=f"tokenizer cache {tok_path}", wait=True):
        if tok_path.is_file():
            return load_tokenizer(tok_path)
        if vocab_size > _MAX_TOKEN_ID + 1:  # refuse before spending time training
            raise ValueError(f"vocab_size={vocab_size} does not fit uint16 token files (max {_MAX_TOKEN_ID + 1})")
        train_texts = (t for s, t in assign_splits(texts(), val_fraction, seed, whole_file) if s == "train")
        sample = list(islice(train_texts, train_docs))
        if not sample:
            raise ValueError(f"empty corpus: {spec['source']!r} has no training documents")
        tok = train_tokenizer(sample, vocab_size, show_progress=progress)
        save_tokenizer(tok, tok_path)
        return tok
