"""Issue 24.6: ``ablate`` streams its texts and stops at ``--max-tokens`` text tokens (like
``polytope``), so one huge document or ``--n-texts 1000000000`` costs no more than the cap;
running out of memory is one line (exit 1)."""

from __future__ import annotations

import json

import pytest
import torch

from bilinear_lens.commands import ablate as ablate_cmd
from bilinear_lens.data.packing import document_stream, stream_rows
from bilinear_lens.data.synthetic import synthetic_stories
from bilinear_lens.models.model import BilinearTransformer


@pytest.fixture(scope="module")
def checkpoint(saved_checkpoint):
    return saved_checkpoint(n_ctx=32)


def ablate_json(capsys, *argv: str) -> dict:
    assert ablate_cmd.main([*argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_huge_document_is_cut_at_max_tokens(checkpoint, tmp_path, capsys) -> None:
    model = BilinearTransformer.from_pretrained(checkpoint)
    huge = " ".join(synthetic_stories(400, seed=3))  # one document of ~40k tokens
    (tmp_path / "huge.txt").write_text(huge, encoding="utf-8")
    report = ablate_json(capsys, "--checkpoint", str(checkpoint), "--text-file", str(tmp_path / "huge.txt"),
                         "--max-tokens", "100", "--seq-len", "16", "--top", "2")
    assert report["capped"] is True and report["max_tokens"] == 100 and report["n_documents"] == 1
    ids = model.tokenizer.encode(huge, add_special_tokens=False)
    assert len(ids) > 10_000
    expected, overlap = stream_rows([model.tokenizer.bos_token_id] + ids[:100], 16)  # BOS + the first 100 tokens
    assert report["stream_tokens"] == 101 and report["overlap"] == overlap
    assert report["tokens"] == list(expected.shape)

    assert ablate_cmd.main(["--checkpoint", str(checkpoint), "--text-file", str(tmp_path / "huge.txt"),
                            "--max-tokens", "100", "--seq-len", "16", "--top", "1", "--quiet"]) == 0
    assert "1 of the file's 1 document (--n-texts 32), capped at --max-tokens 100 text tokens" in capsys.readouterr().out


def test_a_billion_texts_read_only_what_the_cap_needs(checkpoint, capsys) -> None:
    report = ablate_json(capsys, "--checkpoint", str(checkpoint), "--n-texts", "1000000000", "--max-tokens", "300",
                         "--seq-len", "16", "--top", "2")
    model = BilinearTransformer.from_pretrained(checkpoint)
    stories = synthetic_stories(report["n_documents"], seed=0)
    stream = document_stream(model.tokenizer, stories)
    n_text = sum(1 for t in stream if t != model.tokenizer.bos_token_id)
    assert report["capped"] is True and n_text >= 300  # the last story read reached the cap
    assert report["stream_tokens"] == len(stream) - (n_text - 300)  # and was cut at it


def test_below_the_cap_nothing_changes(checkpoint, capsys) -> None:
    model = BilinearTransformer.from_pretrained(checkpoint)
    report = ablate_json(capsys, "--checkpoint", str(checkpoint), "--n-texts", "4", "--seq-len", "16", "--top", "3")
    stream = document_stream(model.tokenizer, synthetic_stories(4, seed=0))
    rows, overlap = stream_rows(stream, 16)
    assert report["capped"] is False and report["n_documents"] == 4
    assert (report["stream_tokens"], report["overlap"], report["tokens"]) == (len(stream), overlap, list(rows.shape))
    from bilinear_lens.activations.ablation import ablation_sweep

    table = ablation_sweep(model.eval(), rows, 0, position=None)
    assert [r["neuron"] for r in report["neurons"]] == [r["neuron"] for r in table.top(3, by="delta_loss").rows()]


def test_limits_are_one_line_errors(checkpoint, capsys, monkeypatch) -> None:
    assert ablate_cmd.main(["--checkpoint", str(checkpoint), "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err == "bilinear-lens ablate: error: --max-tokens must be >= 1, got 0\n"

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(ablate_cmd, "ablation_sweep", out_of_memory)
    assert ablate_cmd.main(["--checkpoint", str(checkpoint), "--n-texts", "2", "--seq-len", "16", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("bilinear-lens ablate: error: out of memory ablating 16384 tokens (--max-tokens) of --n-texts 2")
    assert "lower --max-tokens" in err
