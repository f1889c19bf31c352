"""``bilinear-lens train`` on the command line: exit codes (2 for usage/recipe/run-directory
errors, like every command; 1 when training fails) and the recipe's provenance on resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bilinear_lens import cli
from bilinear_lens.commands.train import load_recipe, recipe_origin
from bilinear_lens.locking import LockHeldError
from bilinear_lens.training.config import RunConfig, load_run_config
from bilinear_lens.training.guard import NonFiniteLossError

RECIPE = """\
[model]
d_model = 16
n_layers = 1
n_heads = 2
d_mlp = 32
n_ctx = 16

[data]
source = "synthetic"
vocab_size = 300
max_docs = 300
tokenizer_train_docs = 300
val_fraction = 0.1
cache_dir = "{cache}"

[train]
steps = 4
batch_size = 4
warmup_steps = 1
log_every = 2
eval_every = 0
checkpoint_every = 2
device = "cpu"
num_threads = 1
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "recipes" / "small.toml"
    path.parent.mkdir()
    path.write_text(RECIPE.format(cache=tmp_path / "cache"))
    return path


def run(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["train", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--out", "{tmp}/run"], "--config is required (unless resuming a run that has a run_config.toml)"),
    (["--config", "{tmp}/nope.toml", "--out", "{tmp}/run"], "run config file not found"),
    (["--config", "{recipe}", "--out", "{tmp}/run", "--set", "train.lrr=1"], "unknown key 'lrr' in section [train]"),
    (["--config", "{recipe}", "--out", "{tmp}/run", "--set", "nodot"], "override 'nodot' must look like section.key=value"),
    (["--out", "{tmp}/run", "--resume"], "run config file not found"),
    (["--config", "{recipe}", "--out", "{tmp}/run", "--stop-at", "0"], "--stop-at must be >= 1, got 0"),
])
def test_usage_and_recipe_errors_exit_2(recipe, tmp_path, capsys, argv, message) -> None:
    """Before: 1 here, 2 for the same kind of error in every other command."""
    rc, err = run(capsys, *[a.format(tmp=tmp_path, recipe=recipe) for a in argv])
    assert rc == 2 and message in err, err
    assert err.startswith("bilinear-lens train: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bad_torchrun_environment_exits_2(recipe, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    rc, err = run(capsys, "--config", str(recipe), "--out", str(tmp_path / "run"))
    assert rc == 2 and "WORLD_SIZE" in err


@pytest.mark.parametrize("error, code", [
    (FileExistsError("runs/x already holds checkpoints; pass --resume"), 2),
    (LockHeldError("run directory runs/x is in use by pid 1"), 2),
    (ValueError("train.batch_size=3 must be divisible by ..."), 2),
    (NonFiniteLossError(7, "loss", float("nan"), None), 1),
    (OSError(5, "Input/output error"), 1),  # a full disk has its own one-line message: test_reliab_disk.py
])
def test_errors_from_training_map_to_exit_codes(recipe, tmp_path, capsys, monkeypatch, error, code) -> None:
    """2: refused before any step (run directory, recipe, data); 1: the run itself failed."""
    import bilinear_lens.training.loop as loop

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, "train", fail)
    rc, err = run(capsys, "--config", str(recipe), "--out", str(tmp_path / "run"))
    assert rc == code and err == f"bilinear-lens train: error: {error}\n"


def test_a_resolved_recipe_keeps_its_origin(tmp_path) -> None:
    resolved = tmp_path / "run_config.toml"
    RunConfig.from_dict({"train": {"steps": 5}}, where="recipes/tiny.toml with overrides ['train.steps=5']").save_toml(resolved)
    assert recipe_origin(resolved) == "recipes/tiny.toml with overrides ['train.steps=5']"
    assert load_recipe(resolved, []).source == "recipes/tiny.toml with overrides ['train.steps=5']"
    again = load_recipe(resolved, ["train.steps=9"])
    assert again.source == "recipes/tiny.toml with overrides ['train.steps=5'] with overrides ['train.steps=9']"
    # only the provenance differs from what load_run_config reads
    assert again.train.steps == 9
    assert dataclasses.replace(again, source="") == dataclasses.replace(load_run_config(resolved, ["train.steps=9"]), source="")
    hand_written = tmp_path / "mine.toml"
    hand_written.write_text("# my recipe\n[train]\nsteps = 3\n")
    assert recipe_origin(hand_written) is None and load_recipe(hand_written, []).source == str(hand_written)


def test_resume_keeps_the_original_recipe_in_run_config_headers(recipe, tmp_path, capsys) -> None:
    """Before: after ``--resume`` (recipe read from OUT/run_config.toml), final/run_config.toml
    said ``from OUT/run_config.toml``."""
    out = tmp_path / "run"
    header = f"# resolved run config (from {recipe})"
    assert cli.main(["train", "--config", str(recipe), "--out", str(out), "--stop-at", "2", "--quiet",
                     "--no-progress"]) == 0
    assert (out / "run_config.toml").read_text().splitlines()[0] == header
    # a fresh start into a run with checkpoints is refused, as a usage error
    rc, err = run(capsys, "--config", str(recipe), "--out", str(out), "--quiet", "--no-progress")
    assert rc == 2 and "already holds" in err and "pass --resume (Python: resume=True)" in err  # the CLI flag first
    assert cli.main(["train", "--out", str(out), "--resume", "--quiet", "--no-progress"]) == 0
    assert "final checkpoint" in capsys.readouterr().out
    for path in (out / "run_config.toml", out / "final" / "run_config.toml"):
        assert path.read_text().splitlines()[0] == header, path
    # more steps on resume: the header adds the override to the original recipe
    assert cli.main(["train", "--out", str(out), "--resume", "--quiet", "--no-progress", "--set", "train.steps=6"]) == 0
    assert (out / "final" / "run_config.toml").read_text().splitlines()[0] == (
        f"# resolved run config (from {recipe} with overrides ['train.steps=6'])")
