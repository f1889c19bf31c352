"""Issue 24.5: a resumed run restores its last validation, so its checkpoints record
``metrics.val_loss`` and the CLI prints the val loss an uninterrupted run prints."""

from __future__ import annotations

import json
import re

from bilinear_lens import cli
from bilinear_lens.training.run_dir import checkpoint_path
from conftest import run_config


def printed_val_loss(out: str) -> str:
    match = re.search(r"^val loss (\S+) nats .* \(step (\d+)(?:, the last evaluation before step \d+)?\)$", out, re.M)
    assert match, out
    return f"{match.group(1)} at step {match.group(2)}"


def test_resume_prints_and_records_the_uninterrupted_val_loss(cache_dir, tmp_path, capsys) -> None:
    recipe = tmp_path / "recipe.toml"
    run_config(cache_dir, steps=8, eval_every=4, checkpoint_every=0).save_toml(recipe)
    base = ["train", "--config", str(recipe), "--no-progress", "--quiet"]

    assert cli.main([*base, "--out", str(tmp_path / "straight"), "--stop-at", "6"]) == 0
    straight = printed_val_loss(capsys.readouterr().out)
    assert straight.endswith("at step 4")  # evaluated at step 4 (eval_every 4), and said so
    assert cli.main([*base, "--out", str(tmp_path / "resumed"), "--stop-at", "5"]) == 0
    capsys.readouterr()
    assert cli.main([*base, "--out", str(tmp_path / "resumed"), "--resume", "--stop-at", "6"]) == 0
    assert printed_val_loss(capsys.readouterr().out) == straight  # the step-4 validation, in both

    def recorded(run: str) -> float:
        state = json.loads((checkpoint_path(tmp_path / run, 6) / "train_state.json").read_text())
        return state["metrics"]["val_loss"]

    assert recorded("resumed") is not None and recorded("resumed") == recorded("straight")

