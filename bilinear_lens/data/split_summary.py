"""One status line saying how training cut its corpus into documents and which of them are
validation (issue 25 audit: a 713-story ``.txt`` without ``<|endoftext|>`` lines became ONE
document under ``auto``, its validation split the last 5% cut mid-story, and ``train``
said only ``tokenizing: 2 doc``, counting the head and tail of the one document; it now
counts documents, ``tokenizing: 1 doc``)::

    documents: file (auto: no <|endoftext|> lines in stories.txt), 1 document; val = its last 5% (cut mid-document)
    documents: endoftext (auto: <|endoftext|> lines in stories.txt), 714 documents; val = 36 whole documents (val_fraction 0.05, seed 0)

Built from the token cache's sidecars (:attr:`bilinear_lens.data.corpus.TokenBlocks.meta`),
so it costs nothing and is the same whether the cache was just written or only read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

__all__ = ["documents_line", "document_count"]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def document_count(spec: Mapping[str, Any], n_train: int, n_val: int) -> int:
    """Documents of a corpus cached under ``spec`` whose splits hold ``n_train`` and ``n_val``
    pieces (the sidecars' ``n_docs``): their sum, except under the ``file`` rule, where the
    pieces are the head and tail of the one document."""
    return 1 if spec.get("documents") == "file" else n_train + n_val


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def documents_line(spec: Mapping[str, Any], requested: str, n_train: int, n_val: int, val_fraction: float,
                   seed: int) -> str:
    """The status line for a corpus cached under the source spec ``spec``
    (:func:`~bilinear_lens.data.corpus.source_spec`: ``source``, ``documents`` for a
    ``.txt`` file, ``split``, ``text_column``) with ``n_train`` training and ``n_val``
    validation documents; ``requested``: the recipe's ``data.documents`` (``"auto"`` is
    explained); ``val_fraction`` and ``seed``: the split."""
    source = str(spec.get("source", ""))
    rule = spec.get("documents")
    if rule == "file":  # the whole file is one document: its head trains, its tail validates
        why = "auto: no <|endoftext|> lines in " + Path(source).name if requested == "auto" else "data.documents"
        val = (f"val = its last {_percent(val_fraction)} (cut mid-document)" if val_fraction > 0
               else "no val split (val_fraction 0)")
        return f"documents: file ({why}), 1 document; {val}"
    if rule is not None:  # a .txt file under a rule that keeps documents whole
        why = f"auto: <|endoftext|> lines in {Path(source).name}" if requested == "auto" else "data.documents"
        what = f"{rule} ({why})"
    elif source == "synthetic":
        what = f"synthetic stories (data.seed {spec.get('seed', seed)})"
    elif "mtime_ns" in spec:  # a local .jsonl / .json / .parquet file
        what = f"one per row of {Path(source).name} (column {spec.get('text_column', 'text')!r})"
    else:  # a hub dataset
        what = f"one per row of {source} (split {spec.get('split')!r}, column {spec.get('text_column', 'text')!r})"
    val = (f"val = {_count(n_val, 'whole document')} (val_fraction {val_fraction:g}, seed {seed})" if val_fraction > 0
           else "no val split (val_fraction 0)")
    return f"documents: {what}, {_count(n_train + n_val, 'document')}; {val}"
