"""Training-side fixes from the issue 25 user audit, data half: the corpus fingerprint
(bilinear_lens.data.fingerprint), the recorded (absolute) source, the ``documents:`` status
line (bilinear_lens.data.split_summary) and the tokenizer trainer keeping stdout clean (the trainer itself: tests/data/test_tokenizer.py)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from bilinear_lens.data.corpus import corpus_fingerprint, prepare_data, resolved_source
from bilinear_lens.data.fingerprint import (
    FileFingerprint,
    find_difference,
    fingerprint_file,
    read_fingerprint,
    write_fingerprint,
)
from bilinear_lens.data.split_summary import documents_line
from bilinear_lens.data.synthetic import synthetic_stories
from fixtures.tokenizers import SMALL, stories_backend

STORIES = synthetic_stories(40, seed=1)


# --- the fingerprint ----------------------------------------------------------------------


def test_fingerprint_is_size_and_sha256_of_the_bytes(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_bytes(b"Once upon a time.\n" * 1000)
    fp = fingerprint_file(path)
    assert fp.path == str(path.resolve()) and fp.size == 18_000 == path.stat().st_size
    assert fp.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert fp.mtime_ns == path.stat().st_mtime_ns
    assert fp.describe() == f"sha256 {fp.sha256[:8]}..., 18000 bytes"


def test_fingerprint_round_trip_is_plain_json_written_atomically(tmp_path):
    fp = FileFingerprint("/data/stories.txt", 12, "ab" * 32, 123)
    target = tmp_path / "data_fingerprint.json"
    write_fingerprint(target, fp)
    assert read_fingerprint(target) == fp
    record = json.loads(target.read_text())
    assert record["format"] == "bilinear-lens-data-fingerprint" and record["sha256"] == "ab" * 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_fingerprint.json"]  # no temporary left
    assert read_fingerprint(tmp_path / "absent.json") is None


def test_malformed_fingerprint_is_one_line_naming_the_file(tmp_path):
    target = tmp_path / "data_fingerprint.json"
    target.write_text('{"format": "bilinear-lens-data-fingerprint", "size": 3}')
    with pytest.raises(ValueError, match=rf"^data fingerprint {target} is malformed: 'path'$"):
        read_fingerprint(target)


def test_find_difference_same_file_changed_file_and_copy(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one two three", encoding="utf-8")
    recorded = fingerprint_file(path)
    assert find_difference(recorded, path) is None
    copy = tmp_path / "copy.txt"
    copy.write_bytes(path.read_bytes())  # another path, the same bytes: the same training data
    assert find_difference(recorded, copy) is None
    longer = tmp_path / "longer.txt"
    longer.write_text("one two three four", encoding="utf-8")
    found = find_difference(recorded, longer)
    assert found is not None and (found.size, found.sha256) == (18, "")  # sizes differ: not read
    assert found.describe() == "18 bytes"
    path.write_text("one two THREE", encoding="utf-8")  # same size, other bytes
    os.utime(path, ns=(recorded.mtime_ns, recorded.mtime_ns))  # even with the old mtime restored...
    assert find_difference(recorded, path) is None  # ...path+size+mtime is the token cache's rule: trusted
    os.utime(path, ns=(recorded.mtime_ns + 10**9, recorded.mtime_ns + 10**9))
    found = find_difference(recorded, path)
    assert found is not None and found.sha256 == hashlib.sha256(b"one two THREE").hexdigest()


# --- the recorded source ------------------------------------------------------------------


def test_resolved_source_is_absolute_for_local_files_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolved_source("stories.jsonl") == str(tmp_path.resolve() / "stories.jsonl")
    assert resolved_source("./sub/../x.txt") == str(tmp_path.resolve() / "x.txt")
    assert resolved_source("synthetic") == "synthetic"
    assert resolved_source("roneneldan/TinyStories") == "roneneldan/TinyStories"


def test_token_cache_keeps_the_fingerprint_computed_when_it_was_built(tmp_path):
    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n<|endoftext|>\n".join(STORIES), encoding="utf-8")
    tok = stories_backend(*SMALL)
    _, train_blocks, _ = prepare_data(corpus, tok, n_ctx=8, cache_dir=tmp_path / "cache", val_fraction=0.1)
    expected = fingerprint_file(corpus)
    assert corpus_fingerprint(train_blocks) == expected
    assert train_blocks.meta["source"]["sha256"] == expected.sha256  # in the sidecar: read, not re-hashed
    _, again, _ = prepare_data(corpus, tok, n_ctx=8, cache_dir=tmp_path / "cache", val_fraction=0.1)
    assert corpus_fingerprint(again) == expected
    _, synthetic, _ = prepare_data("synthetic", tok, n_ctx=8, cache_dir=tmp_path / "cache", max_docs=50)
    assert corpus_fingerprint(synthetic) is None


# --- the documents: status line -------------------------------------------------------------


def _line(tmp_path, text: str, documents: str = "auto", val_fraction: float = 0.05) -> str:
    corpus = tmp_path / "stories.txt"
    corpus.write_text(text, encoding="utf-8")
    tok = stories_backend(*SMALL)
    _, train_blocks, val_blocks = prepare_data(corpus, tok, n_ctx=4, cache_dir=tmp_path / "cache",
                                               val_fraction=val_fraction, documents=documents)
    n_val = 0 if val_blocks is None else val_blocks.meta["n_docs"]
    return documents_line(train_blocks.meta["source"], documents, train_blocks.meta["n_docs"], n_val,
                          val_fraction, 0)


def test_documents_line_one_file_document_says_its_tail_is_val(tmp_path):
    line = _line(tmp_path, "\n\n".join(STORIES))
    assert line == ("documents: file (auto: no <|endoftext|> lines in stories.txt), 1 document; "
                    "val = its last 5% (cut mid-document)")


def test_documents_line_endoftext_counts_whole_val_documents(tmp_path):
    from bilinear_lens.data.corpus import is_val_document

    line = _line(tmp_path, "\n<|endoftext|>\n".join(STORIES), val_fraction=0.2)
    n_val = sum(is_val_document(s.strip(), 0.2, 0) for s in STORIES)
    assert 0 < n_val < len(STORIES)
    assert line == (f"documents: endoftext (auto: <|endoftext|> lines in stories.txt), {len(STORIES)} documents; "
                    f"val = {n_val} whole documents (val_fraction 0.2, seed 0)")


def test_documents_line_explicit_rule_and_other_sources():
    assert documents_line({"source": "/d/s.txt", "documents": "paragraph"}, "paragraph", 9, 1, 0.1, 3) == (
        "documents: paragraph (data.documents), 10 documents; val = 1 whole document (val_fraction 0.1, seed 3)")
    assert documents_line({"source": "/d/s.txt", "documents": "file"}, "file", 1, 0, 0.0, 0) == (
        "documents: file (data.documents), 1 document; no val split (val_fraction 0)")
    jsonl = {"source": "/d/rows.jsonl", "size": 5, "mtime_ns": 1, "text_column": "story"}
    assert documents_line(jsonl, "auto", 7, 0, 0.0, 0) == (
        "documents: one per row of rows.jsonl (column 'story'), 7 documents; no val split (val_fraction 0)")
    hub = {"source": "roneneldan/TinyStories", "split": "train", "text_column": "text"}
    assert documents_line(hub, "auto", 95, 5, 0.05, 0) == (
        "documents: one per row of roneneldan/TinyStories (split 'train', column 'text'), 100 documents; "
        "val = 5 whole documents (val_fraction 0.05, seed 0)")
    assert documents_line({"source": "synthetic", "seed": 2}, "auto", 19, 1, 0.05, 2).startswith(
        "documents: synthetic stories (data.seed 2), 20 documents; val = 1 whole document")


# --- stdout stays the result stream ---------------------------------------------------------


def test_prepare_data_with_progress_writes_nothing_to_stdout(tmp_path, capfd):
    prepare_data("synthetic", None, vocab_size=300, n_ctx=8, cache_dir=tmp_path, max_docs=200, progress=True)
    out, _ = capfd.readouterr()
    assert out == ""
