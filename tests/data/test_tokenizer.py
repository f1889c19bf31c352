"""Byte-level BPE tokenizer: training, round trip, save/load, HF wrapper."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers

from bilinear_lens.data.synthetic import synthetic_stories
from bilinear_lens.data.tokenizer import (
    SEPARATOR_ID,
    SPECIAL_TOKEN,
    load_tokenizer,
    save_tokenizer,
    to_hf_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return synthetic_stories(2000, seed=0)


@pytest.fixture(scope="module")
def tokenizer(corpus: list[str]) -> Tokenizer:
    return train_tokenizer(corpus, vocab_size=1024)


def test_special_token_is_id_zero_and_vocab_bounded(tokenizer: Tokenizer) -> None:
    assert tokenizer.token_to_id(SPECIAL_TOKEN) == SEPARATOR_ID == 0
    assert 257 < tokenizer.get_vocab_size() <= 1024
    # frequent words become single tokens
    assert tokenizer.encode(" happy").tokens == ["Ġhappy"]


def test_round_trip_on_synthetic_corpus(tokenizer: Tokenizer, corpus: list[str]) -> None:
    held_out = synthetic_stories(300, seed=99)
    for text in corpus[:300] + held_out:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    odd = "  Ünïcode ☃ 🙂\n\ttabs\n\nand  double  spaces "
    assert tokenizer.decode(tokenizer.encode(odd).ids) == odd


def test_training_is_deterministic(tokenizer: Tokenizer, corpus: list[str]) -> None:
    assert tokenizer_hash(train_tokenizer(corpus, vocab_size=1024)) == tokenizer_hash(tokenizer)


def test_save_load_gives_identical_ids(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = save_tokenizer(tokenizer, tmp_path / "sub" / "tokenizer.json")
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp left
    for loaded in (load_tokenizer(path), load_tokenizer(path.parent)):
        assert tokenizer_hash(loaded) == tokenizer_hash(tokenizer)
        texts = synthetic_stories(50, seed=5)
        assert [e.ids for e in loaded.encode_batch(texts)] == [e.ids for e in tokenizer.encode_batch(texts)]


def test_hash_ignores_what_does_not_change_cached_ids(tokenizer: Tokenizer, corpus: list[str], tmp_path: Path) -> None:
    """A ``transformers`` round trip adds a post-processor; the cached ids (no special
    tokens) are the same, so the hash must be too, or the token cache is rebuilt for nothing."""
    from tokenizers import processors

    to_hf_tokenizer(tokenizer).save_pretrained(str(tmp_path / "hf"))
    round_trip = load_tokenizer(tmp_path / "hf")
    templated = Tokenizer.from_str(tokenizer.to_str())
    templated.post_processor = processors.TemplateProcessing(single=f"{SPECIAL_TOKEN} $A", special_tokens=[(SPECIAL_TOKEN, 0)])
    texts = synthetic_stories(20, seed=6)
    for other in (round_trip, templated):
        assert [e.ids for e in other.encode_batch(texts, add_special_tokens=False)] == [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        assert tokenizer_hash(other) == tokenizer_hash(tokenizer)
    assert templated.to_str() != tokenizer.to_str()  # the JSON did change
    # what does change the ids changes the hash: another vocabulary, another normalizer
    assert tokenizer_hash(train_tokenizer(corpus, vocab_size=512)) != tokenizer_hash(tokenizer)
    lowercased = Tokenizer.from_str(tokenizer.to_str())
    lowercased.normalizer = normalizers.Lowercase()
    assert tokenizer_hash(lowercased) != tokenizer_hash(tokenizer)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    bad = Tokenizer(models.BPE())
    bad.add_special_tokens(["<pad>", SPECIAL_TOKEN])  # separator at id 1
    bad.save(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="id 0"):
        load_tokenizer(tmp_path / "bad.json")


def test_rejects_too_small_vocab(corpus: list[str]) -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 257"):
        train_tokenizer(corpus[:10], vocab_size=100)


def test_hf_wrapper(tokenizer: Tokenizer) -> None:
    hf = to_hf_tokenizer(tokenizer)
    assert hf.bos_token_id == hf.eos_token_id == hf.pad_token_id == SEPARATOR_ID
    assert len(hf) == tokenizer.get_vocab_size()
    text = "Lily was not happy. The dog was not sad."
    ids = hf(text)["input_ids"]
    assert ids == tokenizer.encode(text).ids
    assert hf.decode(ids) == text


def test_training_with_progress_writes_nothing_to_stdout(capfd):
    # tokenizers' trainer draws its bar's blank lines on file descriptor 1, the commands' result
    # stream (3 newlines before the fix): shown only when stdout and stderr are terminals
    tok = train_tokenizer(synthetic_stories(40, seed=1), 300, show_progress=True)
    out, _ = capfd.readouterr()
    assert out == "" and tok.get_vocab_size() > 257
