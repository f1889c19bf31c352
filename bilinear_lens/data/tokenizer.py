"""Byte-level BPE tokenizers: train, save, load, fingerprint, and wrap for TransformerLens.

One special token, ``<|endoftext|>``, always has id 0 (:data:`SEPARATOR_ID`); it is the BOS
token and the separator between packed documents. Byte-level BPE has no unknown token, so
``decode(encode(text)) == text`` for any text without the special token in it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from bilinear_lens.files.names import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from bilinear_lens.files.serialized import CheckpointError

__all__ = [
    "SPECIAL_TOKEN",
    "SEPARATOR_ID",
    "DEFAULT_VOCAB_SIZE",
    "train_tokenizer",
    "save_tokenizer",
    "load_tokenizer",
    "tokenizer_hash",
    "to_hf_tokenizer",
    "read_tokenizer_file",
    "load_model_tokenizer",
    "save_model_tokenizer",
]

SPECIAL_TOKEN = "<|endoftext|>"
SEPARATOR_ID = 0
DEFAULT_VOCAB_SIZE = 4096
# 256 byte symbols plus the special token: the smallest vocabulary a byte-level BPE can have.
_MIN_VOCAB_SIZE = 257


def _check_special_token(tokenizer: Tokenizer, where: str) -> None:
    if tokenizer.token_to_id(SPECIAL_TOKEN) != SEPARATOR_ID:
        raise ValueError(
            f"{where}: expected {SPECIAL_TOKEN!r} to have id {SEPARATOR_ID}, "
            f"got {tokenizer.token_to_id(SPECIAL_TOKEN)}"
        )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (any iterable of documents).

    The vocabulary holds the 256 byte symbols, ``<|endoftext|>`` (id 0) and up to
    ``vocab_size - 257`` merges. On a small corpus (e.g. the synthetic stories, a few
    hundred words) BPE runs out of merges first, so ``get_vocab_size()`` may be smaller
    than ``vocab_size``: size the model's embedding from the tokenizer, not the request.

    ``show_progress``: the ``tokenizers`` trainer's bar, which writes to stdout (the
    commands' result stream): shown only when both stdout and stderr are terminals.
    """
    if vocab_size < _MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB_SIZE} (256 bytes + {SPECIAL_TOKEN}), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False keeps decode(encode(text)) == text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[SPECIAL_TOKEN],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress and _on_terminal(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    _check_special_token(tokenizer, "trained tokenizer")
    return tokenizer


def _on_terminal() -> bool:
    """Whether file descriptors 1 and 2 are both terminals (the Rust trainer writes to the
    descriptors themselves, whatever ``sys.stdout`` has been replaced by)."""
    try:
        return os.isatty(1) and os.isatty(2)
    except OSError:
        return False


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike[str]) -> Path:
    """Write ``tokenizer`` to ``path`` (a ``tokenizer.json``) atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)  # readers see the old file or the whole new one, never a part
    return path


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a ``tokenizer.json`` (a file, or a directory holding one).

    Raises ``FileNotFoundError`` naming the path, and ``ValueError`` if the tokenizer does
    not have ``<|endoftext|>`` as id 0 (the packing in :mod:`bilinear_lens.data.corpus` needs it).
    """
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    tokenizer = read_tokenizer_file(path)
    _check_special_token(tokenizer, str(path))
    return tokenizer


def read_tokenizer_file(path: str | os.PathLike[str]) -> Tokenizer:
    """Parse a ``tokenizer.json``; a missing file raises ``FileNotFoundError`` and a corrupt or
    binary one a one-line :class:`CheckpointError`, both naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for every parse error
        raise CheckpointError(f"tokenizer file {path} is corrupt or not a tokenizers JSON file: {_first_line(err)}") from None


def load_model_tokenizer(directory: str | os.PathLike[str]) -> Optional[PreTrainedTokenizerFast]:
    """The ``transformers`` tokenizer of a model directory, or ``None`` without ``tokenizer.json``.

    With ``tokenizer_config.json`` (HF layout: any tokenizer, its own BOS/EOS/pad, possibly
    no BOS) the special tokens come from it; without, the tokenizer must be one of ours
    (``<|endoftext|>`` as id 0, wrapped by :func:`to_hf_tokenizer`). Corrupt files raise
    :class:`CheckpointError` naming the file.
    """
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return None
    backend = read_tokenizer_file(path)  # one-line error for a corrupt file, before transformers parses it
    config_path = directory / TOKENIZER_CONFIG_FILE
    if not config_path.is_file():
        _check_special_token(backend, str(path))
        return to_hf_tokenizer(backend)
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers raises JSON, OS and value errors here
        raise CheckpointError(f"tokenizer files in {directory} ({config_path.name}) cannot be loaded: {_first_line(err)}") from None


def save_model_tokenizer(tokenizer: object, directory: str | os.PathLike[str], full: bool = False) -> None:
    """Write a model directory's tokenizer files, read back by :func:`load_model_tokenizer`.

    One of ours (``<|endoftext|>`` as id 0 and as BOS/EOS/pad, what :func:`to_hf_tokenizer`
    rebuilds) needs only ``tokenizer.json``; any other ``transformers`` tokenizer, or
    ``full=True`` (the HF layout, for ``AutoTokenizer``), also gets ``tokenizer_config.json``.
    """
    directory = Path(directory)
    if full or not _is_ours(tokenizer):
        tokenizer.save_pretrained(str(directory))  # type: ignore[attr-defined]
    else:
        getattr(tokenizer, "backend_tokenizer", tokenizer).save(str(directory / TOKENIZER_FILE))


def _is_ours(tokenizer: object) -> bool:
    """A bare ``tokenizers.Tokenizer``, or a wrapper :func:`to_hf_tokenizer` would rebuild."""
    if not hasattr(tokenizer, "save_pretrained"):
        return True
    backend = getattr(tokenizer, "backend_tokenizer", None)
    specials = {getattr(tokenizer, f"{t}_token", None) for t in ("bos", "eos", "pad")}
    return backend is not None and backend.token_to_id(SPECIAL_TOKEN) == SEPARATOR_ID and specials == {SPECIAL_TOKEN}


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# The parts of a tokenizer.json that decide ``encode(text, add_special_tokens=False)``, the
# ids a token cache holds. The post-processor (BOS/EOS templates), decoder, padding and
# truncation do not: ``transformers`` adds a post-processor when it saves a tokenizer, and
# hashing it made the SAE trainer re-tokenize a corpus the model's run had already cached.
_ENCODING_PARTS = ("model", "normalizer", "pre_tokenizer", "added_tokens")


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    """SHA-256 hex digest of what decides the token ids of :func:`~bilinear_lens.data.corpus.encode_documents`
    (vocabulary, merges, normalizer, pre-tokenizer, added tokens); stable across save/load and
    across a ``transformers`` round trip, which only adds a post-processor."""
    spec = json.loads(tokenizer.to_str())
    parts = {key: spec.get(key) for key in _ENCODING_PARTS}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


def to_hf_tokenizer(tokenizer: Tokenizer, model_max_length: Optional[int] = None) -> PreTrainedTokenizerFast:
    """Wrap ``tokenizer`` as a ``transformers`` fast tokenizer with bos/eos/pad set to
    ``<|endoftext|>`` (what TransformerLens' ``TransformerBridge`` expects)."""
    _check_special_token(tokenizer, "to_hf_tokenizer")
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        **kwargs,
    )
