"""The document rule of local text files: stories stay whole, the validation split never
shares a document with training, every consumer (training, commands) reads one rule."""

import json

import pytest

from bilinear_lens.data.corpus import assign_splits, iter_texts, prepare_data, text_file_rule
from bilinear_lens.data.documents import DOCUMENT_RULES, resolve_document_rule, split_text, tail_split
from bilinear_lens.training.config import DataConfig

STORIES = [
    f"Once upon a time, child {i} had a toy.\n\nChild {i} played with it all day.\n\nThe end."
    for i in range(40)
]


def test_rules_split_as_documented():
    marked = "\n<|endoftext|>\n".join(STORIES)
    assert split_text(marked) == STORIES  # auto finds the marker
    assert split_text(marked, "endoftext") == STORIES
    assert split_text("a\n\nb\n \nc", "paragraph") == ["a", "b", "c"]
    assert split_text("a\nb\n\nc", "line") == ["a", "b", "c"]
    unmarked = "\n\n".join(STORIES)
    assert split_text(unmarked) == [unmarked] == split_text(unmarked, "file")
    # the marker only counts alone on its line; inline it is text
    assert resolve_document_rule("say <|endoftext|> here") == "file"
    assert split_text("a\r\n<|endoftext|>\r\nb") == ["a", "b"]


def test_unknown_rule_is_named():
    with pytest.raises(ValueError, match="documents must be one of auto, endoftext, paragraph, line, file; got 'stories'"):
        split_text("x", "stories")
    with pytest.raises(ValueError, match=r"DataConfig.documents='blank' is invalid: must be one of auto"):
        DataConfig(documents="blank")
    assert DataConfig().documents == "auto" and set(DOCUMENT_RULES) >= {"auto", "file"}


def test_tail_split_cuts_at_a_paragraph_boundary():
    text = "\n\n".join(STORIES)
    head, tail = tail_split(text, 0.1)
    paragraphs = text.split("\n\n")
    assert head.split("\n\n") + tail.split("\n\n") == paragraphs  # nothing lost, no paragraph cut
    assert abs(len(tail) / len(text) - 0.1) < 0.05
    assert tail_split(text, 0.0) == (text, None)
    assert tail_split("one line only", 0.5) == ("one line", "only")  # no break: the space nearest 6.5


def test_whole_file_val_split_shares_no_paragraph(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(STORIES), encoding="utf-8")
    assert text_file_rule(path) == "file"
    pairs = list(assign_splits(iter_texts(path), 0.2, whole_file=True))
    assert [s for s, _ in pairs] == ["train", "val"]
    text = path.read_text(encoding="utf-8")
    assert pairs[0][1] + "\n\n" + pairs[1][1] == text  # head and tail, contiguous, nothing shared


def test_marked_file_val_split_is_per_story(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(STORIES) + "\n<|endoftext|>\n", encoding="utf-8")
    assert text_file_rule(path) == "endoftext"
    pairs = list(assign_splits(iter_texts(path), 0.25))
    assert sorted(t for _, t in pairs) == sorted(STORIES)  # each story whole, once
    assert {s for s, _ in pairs} == {"train", "val"}


def test_training_data_keeps_stories_whole(tmp_path):
    """Before: each paragraph was a document (a separator token mid-story, paragraphs of one
    story on both sides of the split). Now one stream per split, no separator inside."""
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(STORIES), encoding="utf-8")
    tok, train, val = prepare_data(path, vocab_size=300, n_ctx=16, cache_dir=tmp_path / "cache", val_fraction=0.1)
    sidecars = {p.name.split(".")[1]: json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*.json")
                if not p.name.startswith("tokenizer")}
    assert sidecars["train"]["n_docs"] == 1 and sidecars["val"]["n_docs"] == 1
    assert sidecars["train"]["source"]["documents"] == "file"
    # paragraph rule: another cache entry, one document per paragraph
    prepare_data(path, vocab_size=300, n_ctx=16, cache_dir=tmp_path / "cache", val_fraction=0.1, documents="paragraph")
    counts = sorted(json.loads(p.read_text())["n_docs"] for p in (tmp_path / "cache").glob("*.train.json"))
    assert counts[0] == 1 and counts[1] > 40
