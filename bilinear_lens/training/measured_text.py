"""Which text an analysis measures on, packed into token rows, and saying so on every result.

One rule for the CLI (``ablate``, ``report``, ``polytope``), the report and the notebooks,
so they measure on the same tokens and show one answer (issue 25 items 2 and 5). They
measure on ``--text-file`` (``text_file``) when given. Otherwise
they use the model's *own* data as its checkpoint records it (``run_config.toml``'s
``[data]``, written by ``train`` into every checkpoint): the validation documents of that
corpus (the same rule training used: source, ``data.documents``, ``val_fraction``, split
seed), so a TinyStories model is no longer measured on the built-in synthetic stories. A
local corpus is recorded by its absolute path and, beside the record, its fingerprint
(``data_fingerprint.json``: size and SHA-256, :mod:`bilinear_lens.data.fingerprint`); a file
found there that differs is refused in one line naming ``--text-file``, so an analysis never
measures another file and calls it the training data. A
checkpoint with no record (a converted or hand-saved model) falls back to the synthetic
stories *and says so* in the result; a recorded corpus that cannot be read from here (a
relative path from another directory, a hub dataset offline) is a usage error naming the
recorded source and ``--text-file`` (:class:`MeasuredTextError`, a ``ValueError``).

:func:`measured_rows` then packs those documents as training does: tokenized one at a time,
a BOS before each, cut after ``max_tokens`` text tokens (BOS not counted; reading stops
there, so a huge document or ``n_texts`` costs no more than the cap), and the stream cut
into unpadded rows of ``seq_len`` tokens (the last row re-reads ``overlap`` tokens of the
row before, :func:`~bilinear_lens.data.packing.stream_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from jaxtyping import Int
from torch import Tensor

from bilinear_lens.progress import progress_bar

__all__ = ["DEFAULT_MAX_TOKENS", "DEFAULT_N_TEXTS", "DEFAULT_SEQ_LEN", "MeasuredRows", "MeasuredText",
           "MeasuredTextError", "capped_stream", "measured_rows", "measured_text", "recorded_data", "recorded_fingerprint"]

RUN_CONFIG_NAME = "run_config.toml"
DEFAULT_N_TEXTS = 32  # documents measured (ablate's and report's --n-texts)
DEFAULT_SEQ_LEN = 64  # tokens per row, capped at the model's n_ctx
# Text tokens read at most: one ablation sweep runs every neuron's ablation over every row,
# so time and memory grow with the text; 32 synthetic stories hold ~2-4k tokens.
DEFAULT_MAX_TOKENS = 16_384


class MeasuredTextError(ValueError):
    """The text to measure cannot be found or read (a one-line message naming what to give)."""


def read_text_file(path: str) -> str:
    """The UTF-8 text of ``path``; a missing or non-UTF-8 file is a :class:`MeasuredTextError`."""
    file = Path(path)
    if not file.is_file():
        raise MeasuredTextError(f"text file not found: {path}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MeasuredTextError(f"text file {path} is not UTF-8: {err}") from err


@dataclass
class MeasuredText:
    """The documents measured on and where they come from.

    ``origin``: ``"text-file"`` (``--text-file``), ``"training-data"`` (the checkpoint's
    recorded corpus; ``split`` says which part) or ``"synthetic"`` (the built-in stories:
    the recorded corpus, or the fallback when nothing is recorded: ``note`` says which).
    ``documents_in_source``: how many documents the file holds (``None`` when not counted).
    ``texts`` is a list, or a lazy iterator for generated or streamed sources (``--n-texts``
    may be huge; a consumer such as ``ablate`` reads only what its token cap needs and passes
    the count it read to :meth:`describe` / :meth:`to_dict`).
    """

    texts: Iterable[str]
    origin: str
    source: str
    split: Optional[str] = None
    documents: Optional[str] = None
    documents_in_source: Optional[int] = None
    note: Optional[str] = None

    def count(self, n_read: Optional[int] = None) -> Optional[int]:
        """Documents measured: ``n_read`` when the consumer counted, else the list's length."""
        return n_read if n_read is not None else (len(self.texts) if isinstance(self.texts, list) else None)

    def describe(self, n_read: Optional[int] = None) -> str:
        """One phrase for the printed result, e.g. ``"the model's training data (val split
        of stories.txt, documents: endoftext), 32 documents"``."""
        what = {"text-file": f"--text-file {self.source}",
                "training-data": f"the model's training data ({self.split} split of {self.source})",
                "synthetic": f"the built-in synthetic stories ({self.source})"}[self.origin]
        if self.origin == "synthetic" and self.split is not None:  # recorded as the model's corpus
            what = f"the model's training data ({self.split} split of the built-in synthetic stories, {self.source})"
        if self.documents is not None:
            what += f", documents: {self.documents}"
        n = self.count(n_read)
        counted = "some documents" if n is None else f"{n} document{'' if n == 1 else 's'}"
        return f"{what}, {counted}" + (f" [{self.note}]" if self.note else "")

    def to_dict(self, n_read: Optional[int] = None) -> dict[str, Any]:
        return {"origin": self.origin, "source": self.source, "split": self.split, "documents": self.documents,
                "n_documents": self.count(n_read), "documents_in_source": self.documents_in_source,
                "note": self.note}


def recorded_data(checkpoint: str) -> Optional[Any]:
    """The ``[data]`` section (:class:`~bilinear_lens.training.config.DataConfig`) recorded in
    ``checkpoint/run_config.toml`` (or its run directory's), ``None`` when there is none."""
    from bilinear_lens.training.config import load_run_config

    path = Path(checkpoint)
    for candidate in (path / RUN_CONFIG_NAME, path.parent / RUN_CONFIG_NAME):
        if candidate.is_file():
            try:
                return load_run_config(candidate).data
            except (ValueError, FileNotFoundError) as err:
                raise MeasuredTextError(f"cannot read the training record {candidate}: {err}") from None
    return None


def _synthetic_val_documents(data: Any, n_texts: int) -> Iterator[str]:
    from bilinear_lens.data.corpus import is_val_document, iter_texts

    stories = iter_texts("synthetic", "train", seed=data.seed, max_docs=10**9)
    if data.val_fraction > 0:
        stories = (s for s in stories if is_val_document(s, data.val_fraction, data.seed))
    return islice(stories, n_texts)


def recorded_fingerprint(checkpoint: str) -> Optional[Any]:
    """The :class:`~bilinear_lens.data.fingerprint.FileFingerprint` of the local file the
    checkpoint was trained on (``data_fingerprint.json`` beside its ``run_config.toml``, in
    it or its run directory), ``None`` when none is recorded (synthetic or hub data, a run
    recorded before fingerprints, a hand-saved model)."""
    from bilinear_lens.data.fingerprint import DATA_FINGERPRINT_FILE, read_fingerprint

    path = Path(checkpoint)
    for directory in (path, path.parent):
        if (directory / RUN_CONFIG_NAME).is_file():  # the record recorded_data reads: the fingerprint beside it
            try:
                return read_fingerprint(directory / DATA_FINGERPRINT_FILE)
            except ValueError as err:
                raise MeasuredTextError(str(err)) from None
    return None


WORKING_DIRECTORY_NOTE = "relative data.source resolved from the working directory"


def _recorded_local_file(data: Any, checkpoint: str, remedy: Optional[str] = None) -> tuple[Path, Optional[str]]:
    """``(file, note)``: the recorded local corpus found from here, checked against the
    recorded fingerprint when there is one (a different file is refused in one line, ending
    in ``remedy``: what to give instead; default: ``--text-file``, the analyses' option).
    Without a fingerprint (a run recorded before them) a relative path is tried from the
    working directory, then from the run directory's parent; ``note`` says so when only the
    working directory held it (it may be another file of the same name)."""
    from bilinear_lens.data.fingerprint import find_difference

    source = Path(data.source).expanduser()
    run_parent = Path(checkpoint).resolve().parent.parent
    candidates = [source] if source.is_absolute() else [source, run_parent / source]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise MeasuredTextError(f"the model was trained on {data.source} (data.source in its {RUN_CONFIG_NAME}), which "
                                "is not found from here; " + (remedy or "give the text to measure with --text-file"))
    recorded = recorded_fingerprint(checkpoint)
    if recorded is not None:
        differs = find_difference(recorded, found)
        if differs is not None:
            there = "the file there now differs" if str(found.resolve()) == recorded.path else f"{found} differs"
            raise MeasuredTextError(f"the model was trained on {recorded.path} ({recorded.describe()}); {there} "
                                    f"({differs.describe()}): {remedy or 'give --text-file'}")
        return found, None
    from_cwd_only = (not source.is_absolute() and found == source
                     and not ((run_parent / source).is_file() and (run_parent / source).resolve() == source.resolve()))
    return found, (f"{WORKING_DIRECTORY_NOTE} ({source.resolve()}); the run records no fingerprint of its training "
                   "file" if from_cwd_only else None)


def _training_documents(data: Any, checkpoint: str, n_texts: Optional[int]) -> MeasuredText:
    """The validation documents of the recorded corpus (training documents when it had no
    validation split), first ``n_texts`` of them."""
    from bilinear_lens.data.corpus import (CorpusUnavailableError, is_local_source, assign_splits, iter_texts,
                                           text_file_rule)

    local = is_local_source(data.source)
    found, note = _recorded_local_file(data, checkpoint) if local else (None, None)
    path = str(found) if found is not None else data.source
    rule = text_file_rule(path, data.documents) if local else None
    want = "val" if data.val_fraction > 0 else "train"
    try:
        texts = iter_texts(path, data.split, text_column=data.text_column, documents=data.documents,
                           streaming=not local)
        chosen = (t for s, t in assign_splits(texts, data.val_fraction, data.seed, rule == "file") if s == want)
        documents = list(islice(chosen, n_texts))
    except CorpusUnavailableError as err:
        raise MeasuredTextError(f"the model's training data cannot be read here ({err}); give --text-file") from None
    if not documents:
        raise MeasuredTextError(f"the {want} split of the model's training data {data.source} holds no documents; "
                         "give --text-file")
    return MeasuredText(documents, "training-data", data.source, split=want, documents=rule, note=note)


def measured_text(
    text_file: Optional[str], checkpoint: Optional[str], n_texts: Optional[int], seed: int = 0, documents: str = "auto",
    fallback_n_texts: int = 32,
) -> MeasuredText:
    """The documents a command measures on (see the module docstring): ``--text-file``'s
    first ``n_texts`` (``None``: all) under the ``documents`` rule, else the checkpoint's
    recorded corpus, else ``fallback_n_texts`` synthetic stories (seeded by ``seed``)."""
    if text_file is not None:
        from bilinear_lens.data.documents import resolve_document_rule, split_text

        text = read_text_file(text_file)
        every = split_text(text, documents)
        if not every:
            raise MeasuredTextError(f"text file {text_file} holds no text")
        rule = resolve_document_rule(text, documents)
        note = training_file_note(text_file, checkpoint, every[:n_texts], rule) if checkpoint is not None else None
        return MeasuredText(every[:n_texts], "text-file", text_file, documents=rule, documents_in_source=len(every),
                            note=note)
    data = recorded_data(checkpoint) if checkpoint is not None else None
    count = n_texts if n_texts is not None else fallback_n_texts
    if data is None:
        from bilinear_lens.data.synthetic import iter_synthetic_stories

        return MeasuredText(islice(iter_synthetic_stories(seed), count), "synthetic", f"seed {seed}",
                            note=f"the checkpoint records no training data (no {RUN_CONFIG_NAME}); "
                                 "give --text-file to measure on its own text")
    if data.source == "synthetic":
        return MeasuredText(_synthetic_val_documents(data, count), "synthetic", f"data.seed {data.seed}",
                            split="val" if data.val_fraction > 0 else "train")
    return _training_documents(data, checkpoint, n_texts)


def _is_training_file(text_file: str, data: Any, checkpoint: str) -> bool:
    """Whether ``text_file`` holds the model's training corpus: the bytes its recorded
    fingerprint describes, or (a run recorded without one) the recorded path itself."""
    from bilinear_lens.data.corpus import resolved_source
    from bilinear_lens.data.fingerprint import holds_recorded_bytes

    recorded = recorded_fingerprint(checkpoint)
    if recorded is not None:
        return holds_recorded_bytes(recorded, text_file)
    return str(Path(text_file).expanduser().resolve()) == resolved_source(data.source)


def training_file_note(text_file: str, checkpoint: str, documents: list[str], rule: Optional[str]) -> Optional[str]:
    """A note for a ``--text-file`` that is the model's own training file (``None`` for any
    other file): measured there, the documents the model was trained on count alongside its
    validation documents, so losses read low and effects are measured on seen text. With
    training's document rule the note says how many of ``documents`` were in the training
    split (:func:`~bilinear_lens.data.corpus.is_val_document`, training's own split)."""
    from bilinear_lens.data.corpus import is_local_source, is_val_document, text_file_rule

    data = recorded_data(checkpoint)
    if data is None or not is_local_source(data.source) or not _is_training_file(text_file, data, checkpoint):
        return None
    remedy = "leave out --text-file to measure its val split only"
    training_rule = text_file_rule(text_file, data.documents)
    if rule != training_rule or rule == "file" or data.val_fraction == 0:
        return f"--text-file is the model's training file ({data.source}): the text measured includes text it was " \
               f"trained on; {remedy}"
    trained = sum(not is_val_document(t, data.val_fraction, data.seed) for t in documents)
    return (f"--text-file is the model's training file ({data.source}): {trained} of the {len(documents)} documents "
            f"taken were in its training split; {remedy}")


def capped_stream(tokenizer: Any, texts: Iterable[str], max_tokens: int, progress: bool = False,
                  desc: str = "tokenizing") -> tuple[list[int], int, bool]:
    """``(stream, n_documents, capped)``: ``texts`` as training packs them (a BOS before each
    document, :func:`~bilinear_lens.data.packing.document_stream`), tokenized one document at
    a time and cut after the ``max_tokens``-th text token (BOS not counted); ``n_documents``
    documents were read, ``capped``: the cut dropped text. Reading stops at the cap."""
    texts = iter(texts)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    stream: list[int] = []
    n_text = n_documents = 0
    capped = False
    with progress_bar(total=max_tokens, desc=desc, unit="tok", enabled=progress) as bar:
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=False)
            n_documents += 1
            take = min(len(ids), max_tokens - n_text)
            stream.extend(bos + ids[:take])
            n_text += take
            bar.update(take)
            if n_text >= max_tokens:
                capped = take < len(ids) or next(texts, None) is not None
                break
    return stream, n_documents, capped


@dataclass
class MeasuredRows:
    """The token rows an analysis measures on (:func:`measured_rows`).

    ``rows``: ``[n_rows, seq_len]`` token ids, unpadded; ``documents``: the texts read (in
    order, the last one possibly cut by ``max_tokens``); ``stream_tokens``: tokens in the
    stream (BOS included); ``overlap``: tokens of the row before that the last row re-reads;
    ``capped``: ``max_tokens`` cut the text; ``text``: which text (:class:`MeasuredText`);
    ``document_ids``: each token's document (``[n_rows, seq_len]``,
    :func:`~bilinear_lens.activations.ablation.uncertainty.document_ids`), the clusters a
    sweep's standard errors take (``ablation_sweep(..., documents=measured.document_ids)``),
    ``None`` where fewer than two documents were read (or the tokenizer has no BOS): then
    rows are the samples.
    """

    rows: Int[Tensor, "n_rows seq_len"]
    documents: list[str]
    stream_tokens: int
    overlap: int
    capped: bool
    max_tokens: int
    text: MeasuredText
    document_ids: Optional[Int[Tensor, "n_rows seq_len"]] = None

    @property
    def n_documents(self) -> int:
        return len(self.documents)

    def describe(self) -> str:
        """Which text, e.g. ``"the built-in synthetic stories (data.seed 0), 32 documents [...]"``."""
        return self.text.describe(self.n_documents)


def measured_rows(
    model: Any,
    checkpoint: Optional[str],
    text_file: Optional[str] = None,
    n_texts: Optional[int] = DEFAULT_N_TEXTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seq_len: Optional[int] = None,
    seed: int = 0,
    documents: str = "auto",
    progress: bool = False,
) -> MeasuredRows:
    """The rows ``bilinear-lens ablate`` and ``report`` measure on, with the same defaults:
    :func:`measured_text` (``text_file``, else the ``checkpoint``'s recorded training data,
    else ``n_texts`` synthetic stories seeded by ``seed``; ``checkpoint=None``: no record),
    packed by :func:`capped_stream` and cut into rows of ``seq_len`` tokens (default
    :data:`DEFAULT_SEQ_LEN`, capped at the model's n_ctx). ``model`` needs a tokenizer and
    ``cfg.n_ctx``. Bad values are a one-line ``ValueError`` naming the argument."""
    from bilinear_lens.data.packing import stream_rows

    for name, value in (("n_texts", n_texts), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("measured_rows needs a model with a tokenizer (to read text)")
    n_ctx = model.cfg.n_ctx
    length = min(DEFAULT_SEQ_LEN, n_ctx) if seq_len is None else seq_len
    if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= n_ctx:
        raise ValueError(f"seq_len must be an integer in [2, {n_ctx}] (the loss needs a next token; the model's "
                         f"n_ctx is {n_ctx}), got {seq_len!r}")
    text = measured_text(text_file, checkpoint, n_texts, seed, documents)
    read: list[str] = []

    def kept(texts: Iterable[str]) -> Iterator[str]:
        for t in texts:
            read.append(t)
            yield t

    stream, n_documents, capped = capped_stream(model.tokenizer, kept(text.texts), max_tokens, progress)
    if not stream:
        raise MeasuredTextError(f"the measured text ({text.describe(n_documents)}) has no tokens")
    rows, overlap = stream_rows(stream, length, "seq_len")  # (the cap may have peeked one document past the last)
    return MeasuredRows(rows, read[:n_documents], len(stream), overlap, capped, max_tokens, text,
                        _document_clusters(rows, model.tokenizer.bos_token_id, overlap))


def _document_clusters(rows: Tensor, bos_token_id: Optional[int], overlap: int) -> Optional[Tensor]:
    """Each token's document (:class:`MeasuredRows` ``document_ids``), ``None`` for fewer than two."""
    from bilinear_lens.activations.ablation.uncertainty import document_ids

    if bos_token_id is None:
        return None
    ids = document_ids(rows, bos_token_id, overlap)
    return ids if int(ids.max()) > int(ids.min()) else None
