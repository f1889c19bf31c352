"""Progress off a terminal: whole lines at an interval, nothing when disabled, the real
call sites (training, the ablation sweep) report in a log."""

import io

import pytest
import torch

from bilinear_lens.activations.ablation import ablation_sweep
from bilinear_lens.models.model import build_model
from bilinear_lens.progress import PROGRESS_SECONDS_ENV, LineProgress, line_interval_seconds, progress_bar

from conftest import tiny_config


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_off_a_terminal_have_no_carriage_returns(monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    log = io.StringIO()
    with progress_bar(total=4, desc="ablate", unit="neuron", file=log) as bar:
        for _ in range(4):
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("ablate: 0/4 (0%)")
    assert [line.split()[1] for line in lines[:5]] == ["0/4", "1/4", "2/4", "3/4", "4/4"]
    assert all(line.startswith("ablate: ") for line in lines) and text.endswith("\n")


def test_interval_limits_the_lines(monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "3600")
    log = io.StringIO()
    for _ in progress_bar(range(50), desc="x", file=log):
        pass
    # the first line at the start and one at the end, none in between
    assert [line.split()[1] for line in log.getvalue().splitlines()] == ["0/50", "50/50"]


def test_disabled_writes_nothing_and_terminals_get_tqdm(monkeypatch):
    log = io.StringIO()
    for _ in progress_bar(range(3), desc="x", file=log, enabled=False):
        pass
    assert log.getvalue() == ""
    bar = progress_bar(range(3), desc="x", file=_FakeTerminal())
    assert not isinstance(bar, LineProgress)
    bar.close()


@pytest.mark.parametrize("raw", ["-1", "soon", "inf", "nan"])
def test_bad_interval_is_named(monkeypatch, raw):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, raw)
    with pytest.raises(ValueError, match=f"{PROGRESS_SECONDS_ENV} must be a number of seconds >= 0, got '{raw}'"):
        line_interval_seconds()


def test_ablation_sweep_reports_to_a_log(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    model = build_model(tiny_config(dtype="float64"))
    tokens = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    ablation_sweep(model, tokens, 0, neurons=[0, 1, 2], progress=True)
    err = capsys.readouterr().err
    assert "3/3 (100%)" in err and "\r" not in err


def test_every_item_writes_a_line_per_item_whatever_the_interval(monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "3600")
    log = io.StringIO()
    for _ in progress_bar(range(4), desc="report", unit="section", file=log, every_item=True):
        pass
    assert [line.split()[1] for line in log.getvalue().splitlines()] == ["0/4", "1/4", "2/4", "3/4", "4/4"]
