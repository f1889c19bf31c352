"""Which text an analysis command measures on, and saying so on every result.

``ablate``, ``report`` and ``polytope`` measure on ``--text-file`` when given. Otherwise
they use the model's *own* data as its checkpoint records it (``run_config.toml``'s
``[data]``, written by ``train`` into every checkpoint): the validation documents of that
corpus (the same rule training used: source, ``data.documents``, ``val_fraction``, split
seed), so a TinyStories model is no longer measured on the built-in synthetic stories. A
checkpoint with no record (a converted or hand-saved model) falls back to the synthetic
stories *and says so* in the result; a recorded corpus that cannot be read from here (a
relative path from another directory, a hub dataset offline) is a usage error naming the
recorded source and ``--text-file``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from bilinear_lens.commands.common import UsageError, documents_of_text, read_text_file

__all__ = ["MeasuredText", "measured_text", "recorded_data"]

RUN_CONFIG_NAME = "run_config.toml"


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
        if self.documents is not None:
            what += f", documents: {self.documents}"
        n = self.count(n_read)
        return f"{what}, {'some' if n is None else n} documents" + (f" [{self.note}]" if self.note else "")

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
                raise UsageError(f"cannot read the training record {candidate}: {err}") from None
    return None


def _synthetic_val_documents(data: Any, n_texts: int) -> Iterator[str]:
    from bilinear_lens.data.corpus import is_val_document, iter_texts

    stories = iter_texts("synthetic", "train", seed=data.seed, max_docs=10**9)
    if data.val_fraction > 0:
        stories = (s for s in stories if is_val_document(s, data.val_fraction, data.seed))
    return islice(stories, n_texts)


def _recorded_local_file(data: Any, checkpoint: str) -> Path:
    source = Path(data.source).expanduser()
    for candidate in ([source] if source.is_absolute() else [source, Path(checkpoint).resolve().parent.parent / source]):
        if candidate.is_file():
            return candidate
    raise UsageError(f"the model was trained on {data.source} (data.source in its {RUN_CONFIG_NAME}), which is not "
                     "found from here; give the text to measure with --text-file")


def _training_documents(data: Any, checkpoint: str, n_texts: Optional[int]) -> MeasuredText:
    """The validation documents of the recorded corpus (training documents when it had no
    validation split), first ``n_texts`` of them."""
    from bilinear_lens.data.corpus import (CorpusUnavailableError, is_local_source, assign_splits, iter_texts,
                                           text_file_rule)

    local = is_local_source(data.source)
    path = str(_recorded_local_file(data, checkpoint)) if local else data.source
    rule = text_file_rule(path, data.documents) if local else None
    want = "val" if data.val_fraction > 0 else "train"
    try:
        texts = iter_texts(path, data.split, text_column=data.text_column, documents=data.documents,
                           streaming=not local)
        chosen = (t for s, t in assign_splits(texts, data.val_fraction, data.seed, rule == "file") if s == want)
        documents = list(islice(chosen, n_texts))
    except CorpusUnavailableError as err:
        raise UsageError(f"the model's training data cannot be read here ({err}); give --text-file") from None
    if not documents:
        raise UsageError(f"the {want} split of the model's training data {data.source} holds no documents; "
                         "give --text-file")
    return MeasuredText(documents, "training-data", data.source, split=want, documents=rule)


def measured_text(
    text_file: Optional[str], checkpoint: str, n_texts: Optional[int], seed: int = 0, documents: str = "auto",
    fallback_n_texts: int = 32,
) -> MeasuredText:
    """The documents a command measures on (see the module docstring): ``--text-file``'s
    first ``n_texts`` (``None``: all) under the ``documents`` rule, else the checkpoint's
    recorded corpus, else ``fallback_n_texts`` synthetic stories (seeded by ``seed``)."""
    if text_file is not None:
        from bilinear_lens.data.documents import resolve_document_rule

        text = read_text_file(text_file)
        every = documents_of_text(text, text_file, documents)
        rule = resolve_document_rule(text, documents)
        return MeasuredText(every[:n_texts], "text-file", text_file, documents=rule, documents_in_source=len(every))
    data = recorded_data(checkpoint)
    count = n_texts if n_texts is not None else fallback_n_texts
    if data is None:
        from bilinear_lens.data.synthetic import iter_synthetic_stories

        return MeasuredText(islice(iter_synthetic_stories(seed), count), "synthetic", f"seed {seed}",
                            note=f"the checkpoint records no training data (no {RUN_CONFIG_NAME}); "
                                 "give --text-file to measure on its own text")
    if data.source == "synthetic":
        return MeasuredText(_synthetic_val_documents(data, count), "synthetic", f"data.seed {data.seed}",
                            split="val" if data.val_fraction > 0 else "train",
                            note="the model's training data")
    return _training_documents(data, checkpoint, n_texts)
