"""The HTML report: built from a checkpoint by the CLI, renders in a real browser offline."""

import json
import re

import pytest

from browser import CHROMIUM, ERROR_RECORDER, dump_dom, screenshot
from bilinear_lens.cli import main


@pytest.fixture(scope="module")
def checkpoint(saved_checkpoint):
    return saved_checkpoint("story", n_ctx=64, n_layers=1)


def test_report_cli_writes_self_contained_page(checkpoint, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", "--checkpoint", str(checkpoint), "--out", str(out), "--n-texts", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    page = out.read_text()
    for heading in ("Model", "Attention patterns", "eigendecomposition of Q(u)", "Interactions for logit",
                    "Single-neuron zero ablation", "Polytope boundaries"):
        assert heading in page, heading
    assert "unpkg.com" not in page and "cdn.jsdelivr" not in page, "the page must not need the network"
    assert page.count("data:image/png;base64,") >= 5
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]



def test_report_progress_bar_counts_sections_and_quiet_silences_it(checkpoint, tmp_path, capsys):
    """The bar walks every section group: model, one eigen section per default output token
    (" happy", " sad" when they are single tokens, else the sample's two most frequent),
    interactions, ablation, polytopes; ``--quiet`` prints no bar."""
    out = tmp_path / "report.html"
    assert main(["report", "--checkpoint", str(checkpoint), "--out", str(out), "--n-texts", "2"]) == 0
    bar = capsys.readouterr().err
    assert re.search(r"^report: 6/6 \(100%\) \[", bar, re.M), bar  # a log line (stderr is not a TTY)
    assert main(["report", "--checkpoint", str(checkpoint), "--out", str(out), "--n-texts", "2", "--quiet"]) == 0
    assert "report:" not in capsys.readouterr().err

def test_report_errors(checkpoint, tmp_path, capsys):
    assert main(["report", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "r.html")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err
    assert main(["report", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r.html"), "--layer", "3"]) == 2
    assert "layer 3 is out of range" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_report_n_eigenvectors_above_d_model_names_the_flag(checkpoint, tmp_path, capsys):
    """It used to end in the internal ``k must be in [0, 64], got 1000``."""
    assert main(["report", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r.html"), "--n-eigenvectors", "1000"]) == 2
    assert capsys.readouterr().err == ("bilinear-lens report: error: n_eigenvectors (--n-eigenvectors) must be in [1, 32] "
                                       "(d_model: the eigenvectors Q(u) has), got 1000\n")
    assert not (tmp_path / "r.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary: .ci/run installs Debian's chromium; install it to run")
def test_report_renders_in_headless_chromium(checkpoint, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", "--checkpoint", str(checkpoint), "--out", str(out), "--n-texts", "2"]) == 0
    page = out.read_text().replace("<head>", "<head>\n" + ERROR_RECORDER, 1)
    dom = dump_dom(page, tmp_path)
    errors = re.search(r'data-js-errors="([^"]*)"', dom)
    assert errors is None, f"console errors: {errors.group(1) if errors else ''}"
    containers = re.findall(r'<div id="circuits-vis-[^"]*"[^>]*>(.*?)</div>', dom, flags=re.S)
    assert len(containers) >= 3 and all(c.strip() for c in containers), "every circuitsvis view must render"
    (tmp_path / "with_recorder.html").write_text(page)
    png = tmp_path / "report.png"
    screenshot(tmp_path / "with_recorder.html", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_exit_codes_usage_2_failure_1(checkpoint, tmp_path, capsys, monkeypatch):
    """2: the inputs are wrong (nothing written); 1: they were fine but writing the page failed."""
    with pytest.raises(SystemExit) as done:  # eigendecompositions have no half precision: refused up front
        main(["report", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r.html"), "--dtype", "float16"])
    assert done.value.code == 2 and "argument --dtype: invalid choice: 'float16'" in capsys.readouterr().err
    import bilinear_lens.views.report as report_view

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_view, "write_report", disk_full)
    assert main(["report", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "r.html"), "--quiet"]) == 1
    assert capsys.readouterr().err == "bilinear-lens report: error: [Errno 28] No space left on device\n"
    assert not (tmp_path / "r.html").exists()
