"""Long commands print progress lines when stderr is not a terminal (issue #25 item 7): ``ablate``
and ``circuit patch`` as well as ``train``, ``sae train`` and ``report``; ``--quiet`` silences them.
Under pytest stderr is captured, i.e. not a TTY: exactly a log file's situation."""

from __future__ import annotations

import json

import pytest

from bilinear_lens.commands import ablate, circuit
from bilinear_lens.progress import PROGRESS_SECONDS_ENV


@pytest.fixture
def checkpoint(saved_checkpoint):
    return str(saved_checkpoint("story", n_layers=1))


@pytest.fixture(autouse=True)
def every_step(monkeypatch):
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")  # a line per update, so the test need not wait 30 s


def _progress_lines(err: str, desc: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{desc}: ")]


def test_ablate_prints_progress_lines_off_a_terminal_and_none_with_quiet(checkpoint, capsys):
    argv = ["--checkpoint", checkpoint, "--layer", "0", "--top", "3", "--n-texts", "4", "--max-tokens", "64",
            "--json", "--device", "cpu"]
    assert ablate.main(argv) == 0
    out, err = capsys.readouterr()
    json.loads(out)  # stdout stays the result alone
    lines = [line for line in err.splitlines() if "%" in line and "/" in line]
    assert lines, err
    assert lines[-1].split(": ", 1)[1].startswith("48/48 (100%)")  # the neuron sweep's last line: every neuron
    assert ablate.main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_circuit_patch_prints_progress_lines_off_a_terminal(checkpoint, capsys):
    argv = ["patch", "--checkpoint", checkpoint, "--clean", " Jane was very happy", "--corrupt",
            " Jane was not happy", "--token", " happy", "--json", "--device", "cpu"]
    assert circuit.main(argv) == 0
    out, err = capsys.readouterr()
    json.loads(out)
    assert any("(100%)" in line for line in err.splitlines()), err
    assert circuit.main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
