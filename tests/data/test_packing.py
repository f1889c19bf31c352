"""One packing rule (issue #22 item 4): the purity analysis and notebook 04 pack text as
training and the polytope CLI do (BOS per document, none per row, no padding, context-less
row starts not counted). Before, ``activations.polytope.token_blocks`` put a BOS at every
row start and padded the last row, so the analysis and the CLI measured different text."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from analysis import polytope_purity
from bilinear_lens.commands.polytope import _token_rows, measured_documents
from bilinear_lens.data.documents import split_text
from bilinear_lens.data.packing import count_mask, document_stream, pack_documents, stream_rows

BOS = 0


class WordTokenizer:
    """One token per word: its length + 10 (so no word is BOS); BOS id 0."""

    bos_token_id = BOS
    pad_token_id = BOS

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert not add_special_tokens
        return [len(word) + 10 for word in text.split()]


DOCS = [" ".join("w" * (1 + (7 * d + i) % 9) for i in range(5 + 3 * d)) for d in range(6)]


def model(n_ctx: int) -> SimpleNamespace:
    return SimpleNamespace(tokenizer=WordTokenizer(), cfg=SimpleNamespace(n_ctx=n_ctx))


@pytest.mark.parametrize("n_ctx, max_tokens, warmup", [(8, None, 3), (8, 40, 0), (13, 25, 5), (200, None, 4)])
def test_analysis_packs_as_the_polytope_cli(tmp_path: Path, n_ctx, max_tokens, warmup):
    text = tmp_path / "docs.txt"
    text.write_text("\n\n\n".join(DOCS) + "\n", encoding="utf-8")
    args = SimpleNamespace(text_file=str(text), max_tokens=max_tokens or 10**6, warmup=warmup, seed=0, documents="auto",
                           checkpoint=None)
    documents, _ = measured_documents(args)  # the CLI's reading of --text-file
    rows, mask, counts = _token_rows(model(n_ctx), documents, args.max_tokens, warmup, "docs.txt")
    packed = polytope_purity.pack_text(model(n_ctx), polytope_purity._read_documents(args), args)
    assert torch.equal(packed.rows, rows) and torch.equal(packed.mask, mask) and packed.counts == counts


def test_rows_are_the_training_stream_with_bos_only_at_document_starts():
    n_ctx = 8
    packed = pack_documents(WordTokenizer(), DOCS, n_ctx, warmup=3)
    stream = document_stream(WordTokenizer(), DOCS)
    assert stream == [t for doc in DOCS for t in [BOS, *WordTokenizer().encode(doc)]]
    n_full = len(stream) // n_ctx
    assert packed.rows[:n_full].reshape(-1).tolist() == stream[: n_full * n_ctx]  # no BOS per row, no padding
    assert packed.rows[-1].tolist() == stream[-n_ctx:]
    assert int((packed.rows[:n_full] == BOS).sum()) == stream[: n_full * n_ctx].count(BOS)
    n_text = len(stream) - len(DOCS)
    counted = packed.mask & (packed.rows != BOS)
    assert packed.counts["tokens_read"] == n_text and packed.counts["tokens_beyond_max"] == 0
    assert int(counted.sum()) == n_text - packed.counts["tokens_skipped_row_start"]
    for row, keep in zip(packed.rows.tolist()[1:], packed.mask.tolist()[1:]):
        if row[0] != BOS:  # a mid-document row start: its first positions (up to a BOS) are not counted
            first_bos = row.index(BOS) if BOS in row else n_ctx
            assert not any(keep[: min(3, first_bos)])


def test_max_tokens_cuts_text_tokens_and_short_texts_make_one_row():
    packed = pack_documents(WordTokenizer(), DOCS, 8, max_tokens=10, warmup=0)
    assert int((packed.rows != BOS).logical_and(packed.mask).sum()) == 10 - packed.counts["tokens_skipped_row_start"]
    assert packed.counts["tokens_beyond_max"] == packed.counts["tokens_read"] - 10
    short = pack_documents(WordTokenizer(), DOCS[:1], 100)
    assert short.rows.shape == (1, len(DOCS[0].split()) + 1) and bool(short.mask.all())
    with pytest.raises(ValueError, match="the documents hold no tokens"):
        pack_documents(WordTokenizer(), [], 8)


def test_the_pieces_agree_with_pack_documents():
    assert split_text("a b\n\n\n c \n\n\n\n", "paragraph") == ["a b", "c"]
    stream = document_stream(WordTokenizer(), DOCS)
    rows, overlap = stream_rows(stream, 8)
    assert torch.equal(pack_documents(WordTokenizer(), DOCS, 8, warmup=2).mask, count_mask(rows, BOS, 2, overlap))
    with pytest.raises(ValueError, match="the texts hold 3 tokens, fewer than one row of n_ctx 4"):
        stream_rows([1, 2, 3], 4, "n_ctx")
