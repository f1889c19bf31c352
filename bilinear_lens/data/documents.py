"""Where one document ends in a local text file: the one rule training and every command
(``ablate``, ``report``, ``polytope``) use.

A document is what packing keeps whole (no separator token inside it) and what the
train/validation split assigns as a unit. Plain text has no standard boundary, so the rule
is explicit (``data.documents`` in a recipe, ``--documents`` on the commands):

- ``"endoftext"``: documents are separated by lines holding only ``<|endoftext|>``, the
  format of TinyStories' own text releases (``TinyStoriesV2-GPT4-train.txt``);
- ``"paragraph"``: every blank-line-separated paragraph is a document (this project's rule
  before; it cuts a multi-paragraph story into pieces);
- ``"line"``: one document per non-empty line;
- ``"file"``: the whole file is one document; its validation split is the file's tail
  (the last ``val_fraction`` of its characters, cut at a paragraph boundary), so at most the
  one story across the cut is shared by train and val;
- ``"auto"`` (default): ``"endoftext"`` when the file holds an ``<|endoftext|>`` line, else
  ``"file"``. Both keep stories whole, which paragraph splitting did not.

JSONL/JSON/parquet files have one document per row (their text column): the unambiguous
route for a corpus whose boundaries are known.
"""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["DOCUMENT_RULES", "ENDOFTEXT", "resolve_document_rule", "split_text", "tail_split", "check_document_rule"]

ENDOFTEXT = "<|endoftext|>"
DOCUMENT_RULES = ("auto", "endoftext", "paragraph", "line", "file")
_ENDOFTEXT_LINE = re.compile(r"^[ \t]*<\|endoftext\|>[ \t]*$", re.M)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def check_document_rule(rule: str, field: str = "documents") -> str:
    """``rule`` if it is one of :data:`DOCUMENT_RULES`, else a ``ValueError`` naming ``field``."""
    if rule not in DOCUMENT_RULES:
        raise ValueError(f"{field} must be one of {', '.join(DOCUMENT_RULES)}; got {rule!r}")
    return rule


def resolve_document_rule(text: str, rule: str = "auto") -> str:
    """The concrete rule for ``text``: ``rule`` itself, or for ``"auto"`` ``"endoftext"``
    when a line of ``text`` is exactly ``<|endoftext|>``, else ``"file"``."""
    check_document_rule(rule)
    if rule != "auto":
        return rule
    return "endoftext" if _ENDOFTEXT_LINE.search(text) else "file"


def split_text(text: str, rule: str = "auto") -> list[str]:
    """The documents of ``text`` under ``rule`` (see the module docstring), each stripped
    of surrounding whitespace, empty ones dropped. Inside a document text is kept as it is
    (paragraph breaks included)."""
    text = text.replace("\r\n", "\n")
    rule = resolve_document_rule(text, rule)
    if rule == "endoftext":
        pieces = _ENDOFTEXT_LINE.split(text)
    elif rule == "paragraph":
        pieces = _BLANK_LINE.split(text)
    elif rule == "line":
        pieces = text.split("\n")
    else:  # file
        pieces = [text]
    return [piece.strip() for piece in pieces if piece.strip()]


def tail_split(document: str, val_fraction: float) -> tuple[str, Optional[str]]:
    """``(train, val)``: ``document`` cut at the paragraph boundary nearest to
    ``1 - val_fraction`` of its characters (``val`` is ``None`` for ``val_fraction == 0``).

    Used by the ``"file"`` rule, where the file is one document: the tail is held out as a
    whole, so no paragraph is on both sides. A document without a paragraph boundary, or
    whose nearest boundary would leave one side empty, is cut at a line break, then at a
    space, then at the character position.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return document, None
    target = round(len(document) * (1.0 - val_fraction))
    for pattern in (_BLANK_LINE, re.compile(r"\n"), re.compile(r" ")):
        cuts = [m.start() for m in pattern.finditer(document) if 0 < m.start() < len(document) - 1]
        if cuts:
            cut = min(cuts, key=lambda c: abs(c - target))
            break
    else:
        cut = min(max(target, 1), len(document) - 1)
    return document[:cut].strip(), document[cut:].strip()
