"""The one outer harness of the training commands (commands/run_command.py): exit codes and
status lines of ``train`` and ``sae train``, and image classifiers trained from the real CLI
(``bilinear-lens train --config digits-*.toml``) with exact resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bilinear_lens import cli
from bilinear_lens.commands import run_command
from bilinear_lens.commands.run_command import run_training, status_line
from bilinear_lens.disk_errors import DiskWriteError
from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.locking import LockHeldError
from bilinear_lens.models.image_classifier import load_image_classifier
from bilinear_lens.training.guard import NonFiniteLossError
from bilinear_lens.training.image_train import RECIPE_FILE, main as image_train_main
from bilinear_lens.training.metrics import read_metrics
from conftest import REPO

DIGITS = REPO / "training" / "configs" / "digits-bilinear.toml"
SMALL = ["model.d_mlp=8", "train.steps=12", "train.batch_size=32", "train.eval_every=4", "train.log_every=4",
         "train.checkpoint_every=4", "data.input_noise=0.3", "data.max_train=256"]
NAN = NonFiniteLossError(2, "loss", float("nan"), None)  # its one-line message
TIMING = ("elapsed_s", "tokens_per_s")  # wall-clock fields, the only ones that may differ between runs


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def test_status_lines_for_finished_stopped_and_already_finished_runs():
    path = Path("runs/x/final")
    assert status_line("final SAE", path, 9, True, False) == "final SAE: runs/x/final"
    assert status_line("final SAE", Path("c/step_3"), 3, False, False) == "stopped at step 3; checkpoint: c/step_3"
    assert status_line("final checkpoint", path, 9, True, True) == \
        "already finished at step 9 (nothing trained or written); final checkpoint: runs/x/final"


@pytest.mark.parametrize("error, code", [
    (ValueError("bad recipe"), 2), (FileNotFoundError("no corpus"), 2), (FileExistsError("holds a run"), 2),
    (CheckpointError("corrupt"), 2), (LockHeldError("held by pid 7"), 2),
    (NonFiniteLossError(2, "loss", float("nan"), None), 1), (DiskWriteError("disk full", Path("r"), 28), 1), (OSError("I/O error"), 1),
])
def test_run_training_maps_each_error_type_to_its_exit_code_in_one_line(tmp_path, capsys, error, code):
    def run():
        raise error

    assert run_training("sae", tmp_path, None, run, lambda r: ["never"]) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"bilinear-lens sae: error: {error}\n"


def test_run_training_checks_stop_at_first_and_prints_only_on_rank_0(tmp_path, capsys):
    calls = []
    assert run_training("train", tmp_path, 0, lambda: calls.append(1), lambda r: ["x"]) == 2
    assert calls == [] and capsys.readouterr().err == "bilinear-lens train: error: --stop-at must be >= 1, got 0\n"
    assert run_training("train", tmp_path, 2, lambda: "done", lambda r: [r, "two"]) == 0
    assert capsys.readouterr().out == "done\ntwo\n"
    assert run_training("train", tmp_path, None, lambda: "done", lambda r: [r], is_main=False) == 0
    assert capsys.readouterr().out == ""


@pytest.fixture
def harness_calls(monkeypatch):
    """Record every command's call of the one harness (then run it as usual)."""
    seen = []
    real = run_command.run_training

    def spy(command, *args, **kwargs):
        seen.append(command)
        return real(command, *args, **kwargs)

    monkeypatch.setattr(run_command, "run_training", spy)
    monkeypatch.setattr("bilinear_lens.commands.train.run_training", spy)
    return seen


def test_both_commands_report_stop_at_and_failures_through_the_harness(tmp_path, capsys, monkeypatch, harness_calls):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    stopped = SimpleNamespace(final=tmp_path / "s" / "checkpoints" / "step_3", steps=3, already_finished=False,
                              val_metrics={})
    monkeypatch.setattr("bilinear_lens.sae.train.train_sae", lambda *a, **k: stopped)
    sae = ["sae", "train", "--checkpoint", str(model_dir), "--hook", "blocks.0.hook_resid_mid", "--out",
           str(tmp_path / "s"), "--no-progress"]
    assert cli.main(sae + ["--stop-at", "3"]) == 0
    assert capsys.readouterr().out == f"stopped at step 3; checkpoint: {stopped.final}\n"

    def diverge(*args, **kwargs):
        raise NonFiniteLossError(2, "loss", float("nan"), None)

    monkeypatch.setattr("bilinear_lens.sae.train.train_sae", diverge)
    monkeypatch.setattr("bilinear_lens.training.loop.train", diverge)
    assert cli.main(sae) == 1
    assert capsys.readouterr().err == f"bilinear-lens sae: error: {NAN}\n"
    recipe = tmp_path / "lm.toml"
    recipe.write_text('[data]\nsource = "synthetic"\n')
    assert cli.main(["train", "--config", str(recipe), "--out", str(tmp_path / "t"), "--quiet"]) == 1
    assert capsys.readouterr().err == f"bilinear-lens train: error: {NAN}\n"
    for argv in (sae, ["train", "--config", str(recipe), "--out", str(tmp_path / "t")]):
        assert cli.main(argv + ["--stop-at", "0"]) == 2
        assert capsys.readouterr().err.endswith(": error: --stop-at must be >= 1, got 0\n")
    assert harness_calls == ["sae", "sae", "train", "sae"]  # train checks --stop-at before choosing a trainer


@pytest.mark.slow  # three CLI runs that each load the digits (~7-11 s on this shared machine)
def test_image_training_from_the_cli_resumes_exactly_and_finishes_once(tmp_path, capsys):
    base = ["train", "--config", str(DIGITS), *sets(SMALL), "--no-progress", "--quiet"]
    assert cli.main(base + ["--out", str(tmp_path / "a")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"final checkpoint: {tmp_path / 'a' / 'final'}"
    assert lines[1].startswith("val accuracy 0.") and lines[1].endswith("(step 12)")

    assert cli.main(base + ["--out", str(tmp_path / "b"), "--stop-at", "5"]) == 0
    assert capsys.readouterr().out.startswith("stopped at step 5; checkpoint: ")
    # --resume without --config: the recipe saved in OUT/image_recipe.json
    assert cli.main(["train", "--out", str(tmp_path / "b"), "--resume", "--no-progress", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"final checkpoint: {tmp_path / 'b' / 'final'}", lines[1]]
    a, b = load_image_classifier(tmp_path / "a" / "final"), load_image_classifier(tmp_path / "b" / "final")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    assert json.loads((tmp_path / "b" / RECIPE_FILE).read_text())["train"]["steps"] == 12

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("*") if p.is_file()}
    assert cli.main(["train", "--out", str(tmp_path / "b"), "--resume", "--no-progress", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == \
        f"already finished at step 12 (nothing trained or written); final checkpoint: {tmp_path / 'b' / 'final'}"
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "b").rglob("*") if p.is_file()}


def test_a_bad_image_recipe_is_exit_2_in_one_line_and_the_old_entry_point_still_trains(tmp_path, capsys):
    assert cli.main(["train", "--config", str(DIGITS), "--set", "data.dataset=cifar", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bilinear-lens train: error: {DIGITS} with overrides") and err.count("\n") == 1
    assert "ImageDataSpec.dataset='cifar'" in err and not (tmp_path / "x").exists()
    assert cli.main(["train", "--config", str(DIGITS), "--set", "model.nope=1", "--out", str(tmp_path / "x")]) == 2
    assert "override 'model.nope=1' must be section.key=value" in capsys.readouterr().err
    assert image_train_main(["--config", str(DIGITS), "--out", str(tmp_path / "old"), "--no-progress",
                             *sets(["model.d_mlp=16", "train.steps=4", "train.eval_every=4"])]) == 0
    assert capsys.readouterr().out.startswith("step 4: val_accuracy 0.")
