"""Data pipeline: loading, splitting, tokenizing, the memmap cache, and batch order."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

import bilinear_lens.data.corpus as data
from bilinear_lens.data.corpus import (
    TokenBlocks,
    encode_documents,
    is_val_document,
    load_texts,
    pack_blocks,
    prepare_data,
    split_documents,
)
from bilinear_lens.data.synthetic import synthetic_stories
from bilinear_lens.data.tokenizer import SEPARATOR_ID, save_tokenizer, tokenizer_hash, train_tokenizer

DOCS = [
    "Tom had a red ball.\nHe liked it a lot.",  # multi-line document
    "Lily was not happy.",
    "The dog was not sad. It ran to the park.",
]
N_DOCS = 1500


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return train_tokenizer(synthetic_stories(1000, seed=0), vocab_size=1024)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple]:
    cache = tmp_path_factory.mktemp("cache")
    out = prepare_data("synthetic", None, 1024, 64, cache, val_fraction=0.1, seed=0, max_docs=N_DOCS)
    return cache, out


def _split_docs(tokens: np.ndarray) -> list[list[int]]:
    """Token stream -> documents, splitting at the separator that starts each one."""
    starts = list(np.flatnonzero(tokens == SEPARATOR_ID)) + [len(tokens)]
    assert starts[0] == 0
    return [tokens[a + 1 : b].tolist() for a, b in zip(starts[:-1], starts[1:])]


# --- loading ----------------------------------------------------------------------------


def test_synthetic_source_is_deterministic_and_limited() -> None:
    texts = load_texts("synthetic", max_docs=20, seed=4)
    assert texts == synthetic_stories(20, seed=4)
    assert load_texts("synthetic", max_docs=20, seed=5) != texts
    assert load_texts("synthetic", "validation", max_docs=20, seed=4) != texts
    few = load_texts("synthetic", max_chars=1000, seed=4)
    assert sum(map(len, few[:-1])) < 1000 <= sum(map(len, few))
    assert few == texts[: len(few)]


def test_load_txt_blank_line_separated(tmp_path: Path) -> None:
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(DOCS) + "\n\n\n\n  \n")  # trailing blank lines are not documents
    assert load_texts(path, documents="paragraph") == DOCS
    assert load_texts(str(path), max_docs=2, documents="paragraph") == DOCS[:2]
    bare = tmp_path / "bare.txt"
    bare.write_text("\n\n".join(DOCS))  # no trailing newline after the last document
    assert load_texts(bare, documents="paragraph") == DOCS
    assert load_texts(bare) == ["\n\n".join(DOCS)]  # default: unmarked text is one document


def test_load_txt_endoftext_separated(tmp_path: Path) -> None:
    path = tmp_path / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(DOCS) + "\n<|endoftext|>\n")
    assert load_texts(path) == DOCS == load_texts(path, documents="endoftext")


def test_load_jsonl_json_parquet(tmp_path: Path) -> None:
    jsonl = tmp_path / "stories.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    as_json = tmp_path / "stories.json"
    as_json.write_text(json.dumps([{"text": d} for d in DOCS]))
    parquet = tmp_path / "stories.parquet"
    datasets.Dataset.from_dict({"story": DOCS}).to_parquet(str(parquet))
    assert load_texts(jsonl) == DOCS
    assert load_texts(as_json) == DOCS
    assert load_texts(parquet, text_column="story") == DOCS
    with pytest.raises(ValueError, match="no text column 'text'.*story"):
        load_texts(parquet)


def test_hub_names_go_to_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline check of the hub path: the name, split and streaming flag reach
    ``datasets.load_dataset`` and the "text" column is read."""
    calls = []

    def fake_load_dataset(name: str, **kwargs: object) -> datasets.Dataset:
        calls.append((name, kwargs))
        return datasets.Dataset.from_dict({"text": DOCS, "label": [0, 1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    # the reachability probe needs the network; its own tests are in test_corpus_access.py
    monkeypatch.setattr(data, "check_hub_reachable", lambda name: None)
    assert load_texts("roneneldan/TinyStories", "validation", streaming=True, max_docs=2) == DOCS[:2]
    assert calls == [("roneneldan/TinyStories", {"split": "validation", "streaming": True, "cache_dir": None})]
    with pytest.raises(ValueError, match="no text column 'story'.*label"):
        load_texts("roneneldan/TinyStories", text_column="story")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_texts(tmp_path / "missing.txt")
    csv = tmp_path / "stories.csv"
    csv.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported .*'\.csv'.*supported: \.txt, \.jsonl, \.json, \.parquet"):
        load_texts(csv)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n\n")
    with pytest.raises(ValueError, match="empty corpus.*empty.txt"):
        load_texts(empty)
    with pytest.raises(ValueError, match="max_docs"):
        load_texts("synthetic", max_docs=0)


# --- split --------------------------------------------------------------------------------


def test_val_split_is_seeded_by_document_and_disjoint() -> None:
    texts = synthetic_stories(4000, seed=1)
    train, val = split_documents(texts, 0.1, seed=0)
    assert (train, val) == split_documents(texts, 0.1, seed=0)
    assert split_documents(texts, 0.1, seed=1)[1] != val
    assert set(train).isdisjoint(val) and len(train) + len(val) == len(texts)
    assert 0.07 < len(val) / len(texts) < 0.13
    # membership depends on the text alone: order and corpus size do not matter
    assert split_documents(texts[::-1][:1000], 0.1, seed=0)[1] == [t for t in texts[::-1][:1000] if t in set(val)]
    assert not any(is_val_document(t, 0.0) for t in texts[:100])
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(texts, 1.0)


# --- tokenizing and packing -------------------------------------------------------------------


def test_encode_documents_separates_documents(tokenizer: Tokenizer) -> None:
    texts = synthetic_stories(50, seed=2)
    tokens = encode_documents(tokenizer, texts)
    assert tokens.dtype == np.uint16
    expected = [i for t in texts for i in [SEPARATOR_ID] + tokenizer.encode(t).ids]
    assert tokens.tolist() == expected
    docs = _split_docs(tokens)
    assert [tokenizer.decode(d) for d in docs] == texts


def test_encode_refuses_vocab_beyond_uint16() -> None:
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    big = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    with pytest.raises(ValueError, match="vocab size 70001 does not fit the uint16"):
        encode_documents(big, ["w1 w2"])


def test_pack_blocks_are_contiguous_slices() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    blocks = pack_blocks(tokens, n_ctx=9)
    assert blocks.shape == (100, 10)
    assert np.array_equal(blocks.reshape(-1), tokens)
    blocks = pack_blocks(tokens[:995], n_ctx=9)  # the short tail is dropped
    assert blocks.shape == (99, 10) and np.array_equal(blocks[-1], np.arange(980, 990))
    with pytest.raises(ValueError, match=r"n_ctx=1000 .*1001 tokens.*only 995 tokens"):
        pack_blocks(tokens[:995], n_ctx=1000)
    with pytest.raises(ValueError, match="n_ctx must be >= 1"):
        pack_blocks(tokens, n_ctx=0)


# --- cache and prepare_data -----------------------------------------------------------------


def test_prepared_splits_match_fresh_tokenization(prepared: tuple[Path, tuple]) -> None:
    _, (tok, train, val) = prepared
    texts = synthetic_stories(N_DOCS, seed=0)
    train_docs, val_docs = split_documents(texts, 0.1, seed=0)
    assert np.array_equal(np.asarray(train.tokens), encode_documents(tok, train_docs))
    assert np.array_equal(np.asarray(val.tokens), encode_documents(tok, val_docs))
    assert isinstance(train.tokens, np.memmap)
    # train and val hold disjoint documents that together are the corpus
    decoded_train = {tok.decode(d) for d in _split_docs(np.asarray(train.tokens))}
    decoded_val = {tok.decode(d) for d in _split_docs(np.asarray(val.tokens))}
    assert decoded_train.isdisjoint(decoded_val)
    assert decoded_train | decoded_val == set(texts)
    # blocks are the packed token stream: input/target shift by one
    assert np.array_equal(train.blocks.reshape(-1), np.asarray(train.tokens)[: train.n_blocks * 65])
    block = train[3]
    assert block.shape == (65,) and block.dtype == torch.int64


def test_cache_is_reused_not_rebuilt(prepared: tuple[Path, tuple], monkeypatch: pytest.MonkeyPatch) -> None:
    cache, (tok, train, val) = prepared
    files = sorted(cache.iterdir())
    assert [f.name for f in files if ".tmp" in f.name] == []
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache should have been reused")

    monkeypatch.setattr(data, "build_token_cache", fail)
    monkeypatch.setattr(data, "train_tokenizer", fail)
    monkeypatch.setattr(data, "iter_texts", fail)  # not even the corpus is read
    tok2, train2, val2 = prepare_data("synthetic", None, 1024, 32, cache, val_fraction=0.1, seed=0, max_docs=N_DOCS)
    assert tokenizer_hash(tok2) == tokenizer_hash(tok)
    assert np.array_equal(np.asarray(train2.tokens), np.asarray(train.tokens))
    assert train2.n_ctx == 32  # same cache, other context length
    assert {f: f.stat().st_mtime_ns for f in cache.iterdir()} == mtimes
    sidecar = json.loads(train.path.with_suffix(".json").read_text())
    assert sidecar["token_count"] == train.n_tokens
    assert sidecar["vocab_size"] == tok.get_vocab_size()
    assert sidecar["tokenizer_sha256"] == tokenizer_hash(tok)
    assert sidecar["source"]["source"] == "synthetic"


def test_cache_key_changes_with_tokenizer_and_source(tmp_path: Path, tokenizer: Tokenizer) -> None:
    tok_path = save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    _, a, _ = prepare_data("synthetic", tok_path, n_ctx=16, cache_dir=tmp_path, val_fraction=0.1, max_docs=200)
    _, b, _ = prepare_data("synthetic", tokenizer, n_ctx=16, cache_dir=tmp_path, val_fraction=0.1, max_docs=200)
    _, c, _ = prepare_data("synthetic", tokenizer, n_ctx=16, cache_dir=tmp_path, val_fraction=0.1, max_docs=300)
    assert a.path == b.path != c.path
    assert c.n_tokens > a.n_tokens


def test_local_file_cache_invalidated_on_edit(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(synthetic_stories(100, seed=3)))
    _, first, _ = prepare_data(path, tokenizer, n_ctx=16, cache_dir=tmp_path / "c", val_fraction=0.0)
    path.write_text("\n\n".join(synthetic_stories(120, seed=3)))
    _, second, none = prepare_data(path, tokenizer, n_ctx=16, cache_dir=tmp_path / "c", val_fraction=0.0)
    assert none is None
    assert second.path != first.path and second.n_tokens > first.n_tokens


def test_interrupted_build_leaves_no_cache(tmp_path: Path, tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real_encode = data.encode_documents

    def encode_then_crash(tok: Tokenizer, texts: list[str]) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_encode(tok, texts)

    monkeypatch.setattr(data, "_ENCODE_BATCH_DOCS", 50)
    monkeypatch.setattr(data, "encode_documents", encode_then_crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_data("synthetic", tokenizer, n_ctx=16, cache_dir=tmp_path, max_docs=300)
    assert list(tmp_path.iterdir()) == []  # neither partial files nor a sidecar
    monkeypatch.setattr(data, "encode_documents", real_encode)
    _, train, _ = prepare_data("synthetic", tokenizer, n_ctx=16, cache_dir=tmp_path, max_docs=300)
    assert train.n_tokens > 0


def test_truncated_cache_is_rebuilt(tmp_path: Path, tokenizer: Tokenizer) -> None:
    _, train, _ = prepare_data("synthetic", tokenizer, n_ctx=16, cache_dir=tmp_path, max_docs=200)
    expected = np.asarray(train.tokens).copy()
    path = train.path
    del train
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="truncated"):
        data.open_token_file(path)
    _, rebuilt, _ = prepare_data("synthetic", tokenizer, n_ctx=16, cache_dir=tmp_path, max_docs=200)
    assert np.array_equal(np.asarray(rebuilt.tokens), expected)


def test_prepare_data_errors(tmp_path: Path, tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"n_ctx=100000 is too large for the train split.*only \d+ tokens"):
        prepare_data("synthetic", tokenizer, n_ctx=100_000, cache_dir=tmp_path, max_docs=20)
    # val gets ~10% of 20 documents: a context that fits train fails for val, naming it
    with pytest.raises(ValueError, match=r"n_ctx=\d+ is too large for the val split"):
        prepare_data("synthetic", tokenizer, n_ctx=400, cache_dir=tmp_path, val_fraction=0.1, max_docs=20)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(ValueError, match="empty corpus.*empty.jsonl"):
        prepare_data(empty, None, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="empty corpus.*empty.jsonl"):
        prepare_data(empty, tokenizer, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere.parquet"):
        prepare_data(tmp_path / "nothere.parquet", tokenizer, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="vocab_size=70000 does not fit uint16"):
        prepare_data("synthetic", None, vocab_size=70_000, cache_dir=tmp_path, max_docs=20)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_data("synthetic", tokenizer, cache_dir=tmp_path, val_fraction=-0.1, max_docs=20)
    with pytest.raises(ValueError, match="n_ctx must be >= 1"):
        prepare_data("synthetic", tokenizer, n_ctx=0, cache_dir=tmp_path, max_docs=20)


# --- batches ----------------------------------------------------------------------------


@pytest.fixture()
def blocks() -> TokenBlocks:
    return TokenBlocks(np.arange(100 * 9, dtype=np.uint16) % 60000, n_ctx=8)  # 100 blocks


def test_batches_are_deterministic_and_resumable(blocks: TokenBlocks) -> None:
    first = blocks.batch(7, 16, seed=3)
    assert first.shape == (16, 9) and first.dtype == torch.int64
    assert torch.equal(first, blocks.batch(7, 16, seed=3))
    fresh = TokenBlocks(np.asarray(blocks.tokens), n_ctx=8)  # a resumed run: no history
    assert torch.equal(fresh.batch(7, 16, seed=3), first)
    assert not torch.equal(blocks.batch(7, 16, seed=4), first)
    assert not torch.equal(blocks.batch(8, 16, seed=3), first)
    # rows are whole blocks
    for row in first:
        assert torch.equal(row, blocks[int(row[0]) // 9])


def test_each_epoch_visits_blocks_once_in_a_new_order(blocks: TokenBlocks) -> None:
    per_epoch = blocks.batches_per_epoch(16)
    assert per_epoch == 6
    epochs = [np.concatenate([blocks.block_indices(e * per_epoch + s, 16, seed=0) for s in range(per_epoch)]) for e in range(2)]
    for seen in epochs:
        assert len(set(seen.tolist())) == len(seen) == 96
    assert not np.array_equal(epochs[0], epochs[1])
    assert blocks.epoch(per_epoch, 16) == 1


def test_ranks_are_disjoint_and_make_the_global_batch(blocks: TokenBlocks) -> None:
    for step in (0, 5, 13):
        whole = blocks.batch(step, 24, seed=1)
        shards = [blocks.batch(step, 24, rank=r, world_size=4, seed=1) for r in range(4)]
        assert all(s.shape == (6, 9) for s in shards)
        assert torch.equal(torch.cat(shards), whole)
        ids = [set(blocks.block_indices(step, 24, r, 4, seed=1).tolist()) for r in range(4)]
        assert sum(map(len, ids)) == len(set().union(*ids)) == 24


def test_batch_argument_errors(blocks: TokenBlocks) -> None:
    with pytest.raises(ValueError, match="multiple of world_size=4"):
        blocks.batch(0, 10, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank must be in"):
        blocks.batch(0, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=200 exceeds the 100 blocks"):
        blocks.batch(0, 200)
    with pytest.raises(ValueError, match="step must be >= 0"):
        blocks.batch(-1, 8)


def test_eval_batches_fixed_order_and_rank_partition(blocks: TokenBlocks) -> None:
    batches = list(blocks.eval_batches(32))
    assert [b.shape[0] for b in batches] == [32, 32, 32, 4]
    assert torch.equal(torch.cat(batches), torch.from_numpy(blocks.blocks.astype(np.int64)))
    per_rank = [list(blocks.eval_batches(32, rank=r, world_size=2)) for r in range(2)]
    assert [len(p) for p in per_rank] == [2, 2]
    assert torch.equal(torch.cat([per_rank[0][0], per_rank[1][0], per_rank[0][1], per_rank[1][1]]), torch.cat(batches))

