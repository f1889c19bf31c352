"""One answer (issue 25 item 5): the library call notebook 01 makes
(:func:`~bilinear_lens.training.measured_text.measured_rows` + ``ablation_sweep``), ``bilinear-lens
ablate --json`` and the report's ablation table measure on the same tokens by default and
show the same top neurons with the same standard errors. Before, the CLI, the report and
the notebook each packed their own text (105/132/136 vs 61/145/188 vs 38/135/51)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bilinear_lens.activations.ablation import ablation_sweep
from bilinear_lens.commands import ablate as ablate_cmd
from bilinear_lens.commands import report as report_cmd
from bilinear_lens.data.packing import document_stream, stream_rows
from bilinear_lens.models.model import BilinearTransformer
from bilinear_lens.training.loop import train
from bilinear_lens.training.measured_text import measured_rows, measured_text
from conftest import run_config

TOP = 5


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("one_answer") / "run"
    train(run_config(cache_dir), out, progress=False)
    return out / "final"


def _library_top(checkpoint):
    model = BilinearTransformer.from_pretrained(checkpoint).eval()
    measured = measured_rows(model, str(checkpoint))
    table = ablation_sweep(model, measured.rows, 0, position=None, documents=measured.document_ids, progress=False)
    return measured, table, table.top(TOP, by="delta_loss").rows()


def test_library_rows_are_the_recorded_validation_text_packed_as_training(trained):
    model = BilinearTransformer.from_pretrained(trained)
    measured = measured_rows(model, str(trained), n_texts=5, seq_len=16)
    expected_docs = list(measured_text(None, str(trained), 5).texts)
    assert measured.documents == expected_docs and measured.text.origin == "synthetic"  # the run's val stories
    rows, overlap = stream_rows(document_stream(model.tokenizer, expected_docs), 16)
    assert torch.equal(measured.rows, rows) and measured.overlap == overlap and not measured.capped


def test_ablate_json_reports_the_library_answer(trained, capsys):
    measured, table, top = _library_top(trained)
    assert ablate_cmd.main(["--checkpoint", str(trained), "--top", str(TOP), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == list(measured.rows.shape) and report["stream_tokens"] == measured.stream_tokens
    assert report["n_documents"] == measured.n_documents and report["measured_on"] == measured.describe()
    assert report["baseline_loss"] == table.baseline["loss"]
    keys = ("neuron", "delta_loss", "delta_loss_se", "delta_loss_q")
    got = [tuple(r[k] for k in keys) for r in report["neurons"]]
    assert got == [tuple(r[k] for k in keys) for r in top]  # same computation: exact
    assert report["clusters"] == "documents" and report["n_clusters"] == measured.n_documents


def test_report_table_shows_the_library_answer(trained, tmp_path):
    measured, table, _ = _library_top(trained)
    out = tmp_path / "r.html"
    assert report_cmd.main(["--checkpoint", str(trained), "--out", str(out), "--quiet"]) == 0
    page = out.read_text(encoding="utf-8")
    section = page[page.index("Single-neuron zero ablation"):]
    cells = re.findall(r"<tr><td>(\d+)</td><td>([+-][\d.]+)</td><td>([\d.]+)</td><td>([^<]+)</td>"
                       r"<td>(yes|~0)</td></tr>", section)
    ranked = table.top(20, by="delta_loss").rows()
    assert cells == [(str(r["neuron"]), f"{r['delta_loss']:+.5f}", f"{r['delta_loss_se']:.5f}",
                      f"{r['delta_loss_q']:.3g}", "yes" if r["delta_loss_q"] < 0.05 else "~0") for r in ranked]
    assert f"clustered by documents, {measured.n_documents} of them" in section
    n_rows, seq_len = measured.rows.shape
    assert f"Clean loss {table.baseline['loss']:.4f} on {n_rows} x {seq_len} tokens" in section
    assert "the model&#x27;s training data (val split of the built-in synthetic stories, data.seed 0)" in page
