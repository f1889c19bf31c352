"""The special-token warning counts literals inside documents, not the separator lines the
``--documents`` rule consumes (a user audit: the README's own polytope command warned about
the 299 ``<|endoftext|>`` separator lines of the shipped sample)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bilinear_lens.commands.common import warn_special_token_text

SAMPLE = Path(__file__).resolve().parents[2] / "training" / "sample_stories.txt"


def test_the_shipped_sample_gives_no_warning_under_its_rule(small_tokenizer, capsys):
    assert "<|endoftext|>" in SAMPLE.read_text(encoding="utf-8")  # separator lines, consumed by the rule
    warn_special_token_text(small_tokenizer, str(SAMPLE), "polytope")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("rule, inside", [("auto", 1), ("endoftext", 1), ("file", 3)])
def test_literals_inside_documents_are_counted_under_the_rule(small_tokenizer, tmp_path, capsys, rule, inside):
    path = tmp_path / "t.txt"
    path.write_text("one story\n<|endoftext|>\ntwo <|endoftext|> inside\n<|endoftext|>\nthree", encoding="utf-8")
    warn_special_token_text(small_tokenizer, str(path), "ablate", rule)
    special = small_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert capsys.readouterr().err == (
        f"bilinear-lens ablate: warning: text file {path} holds the literal '<|endoftext|>' {inside} time(s) inside its "
        f"documents (--documents {rule}); it is read as the special token (id {special}), not as text\n")
