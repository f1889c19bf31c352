"""Resuming an SAE run: without a recipe the run's saved sae_recipe.json is used (the CLI's
--resume without --config), a finished run resumes to nothing (no byte written), a recipe
that differs from the saved one is refused with one line naming each differing value
(except [train] values, which may change, as for the model trainer), and `sae` / `sae train`
have plain-text --help descriptions."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from bilinear_lens.cli import main
from bilinear_lens.commands.sae import build_parser
from bilinear_lens.models.model import build_model
from bilinear_lens.sae.model import load_sae
from bilinear_lens.sae.recipe import (
    RECIPE_FILE,
    load_sae_recipe,
    load_saved_recipe,
    recipe_differences,
)
from bilinear_lens.sae.train import train_sae
from bilinear_lens.training.resume_rule import resume_may_change
from bilinear_lens.training.state import read_train_state
from conftest import tiny_config
from fixtures.tokenizers import SMALL, stories_tokenizer

TIMING = ("elapsed_s", "tokens_per_s")  # wall-clock measurements, the only record fields that may differ


def _save_model(path: Path, seed: int) -> Path:
    tok = stories_tokenizer(*SMALL)
    torch.manual_seed(seed)
    model = build_model(tiny_config(d_vocab=len(tok), n_layers=1, seed=seed), tokenizer=tok)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _save_model(tmp_path_factory.mktemp("sae_resume") / "m", seed=0)


def recipe_toml(tmp_path: Path, steps: int = 12) -> Path:
    """A recipe whose every [train] value the CLI would otherwise take from the paper's
    defaults (steps 1000, lr 1e-4, ...), and whose [data] is not the default corpus."""
    path = tmp_path / "r.toml"
    path.write_text(
        "[sae]\nexpansion = 2\nk = 4\ndead_after_steps = 5\n"
        f"[train]\nsteps = {steps}\nbatch_size = 8\nlr = 3e-3\nmin_lr = 3e-4\nlog_every = 3\neval_every = 6\n"
        "eval_batches = 1\ncheckpoint_every = 4\nkeep_last = 2\n"
        f"[data]\nmax_docs = 300\nval_fraction = 0.1\ncache_dir = {json.dumps(str(tmp_path / 'cache'))}\n")
    return path


def cli(checkpoint: Path, out: Path, *args: str) -> int:
    return main(["sae", "train", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress", *args])


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``run_dir``: its bytes and modification time (ns)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_resume_without_config_continues_with_the_saved_recipe_bitwise(checkpoint, tmp_path, capsys):
    """Stopped at step 5, then `--resume` with no --config: the saved recipe (12 steps, lr
    3e-3, 300 docs) finishes the run, equal bit for bit to an uninterrupted one; the paper's
    defaults (1000 steps, lr 1e-4, the full corpus) would give another SAE and schedule."""
    config = recipe_toml(tmp_path)
    straight = train_sae(checkpoint, tmp_path / "a", load_sae_recipe(config), progress=False)
    assert cli(checkpoint, tmp_path / "b", "--config", str(config), "--stop-at", "5") == 0
    saved = (tmp_path / "b" / RECIPE_FILE).read_text()
    assert "stopped at step 5" in capsys.readouterr().out
    assert cli(checkpoint, tmp_path / "b", "--resume") == 0
    assert "final SAE" in capsys.readouterr().out
    resumed = tmp_path / "b" / "final"
    assert read_train_state(resumed).step == 12 and read_train_state(resumed).scheduler["total_steps"] == 12
    for name, tensor in load_sae(straight.final).state_dict().items():
        assert torch.equal(load_sae(resumed).state_dict()[name], tensor), name
    records = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6, 9, 12] and strip(records) == strip(straight.metrics)
    assert all(r["lr"] > 2e-4 for r in records)  # the saved lr 3e-3 -> 3e-4; the paper's default starts at 1e-4
    assert (tmp_path / "b" / RECIPE_FILE).read_text() == saved  # the recipe file still says what was trained
    # the Python API: recipe=None on resume is the saved recipe too
    assert load_saved_recipe(tmp_path / "b").to_dict() == load_sae_recipe(config).to_dict()


def test_resuming_a_finished_run_trains_and_writes_nothing(checkpoint, tmp_path, capsys):
    config = recipe_toml(tmp_path, steps=6)
    out = tmp_path / "run"
    assert cli(checkpoint, out, "--config", str(config)) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert cli(checkpoint, out, "--resume") == 0  # the command: no --config
    text = capsys.readouterr().out
    assert "already finished at step 6" in text and "held-out explained variance" in text
    assert cli(checkpoint, out, "--resume", "--config", str(config)) == 0  # the same recipe, given again
    assert "already finished at step 6" in capsys.readouterr().out
    assert cli(checkpoint, out, "--resume", "--set", "train.lr=1e-2") == 0  # [train] may differ: still finished
    result = train_sae(checkpoint, out, None, resume=True, progress=False)
    assert result.already_finished and result.steps == 6 and result.final == out / "final"
    assert result.val_metrics["val_l0"] <= 4 and [r["step"] for r in result.metrics] == [3, 6]
    assert snapshot(out) == before  # final/, checkpoints, sae_recipe.json, metrics.jsonl: not a byte, not a touch


def test_a_recipe_that_differs_on_resume_is_refused_naming_each_field(checkpoint, tmp_path, capsys):
    config = recipe_toml(tmp_path)
    out = tmp_path / "run"
    assert cli(checkpoint, out, "--config", str(config), "--stop-at", "4") == 0
    capsys.readouterr()
    before = snapshot(out)
    assert cli(checkpoint, out, "--resume", "--config", str(config), "--hook", "blocks.0.hook_resid_post") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SAEConfig(" not in err and "SAERecipe(" not in err
    assert "sae.hook: 'blocks.0.hook_resid_mid' (saved) != 'blocks.0.hook_resid_post' (given)" in err
    assert cli(checkpoint, out, "--resume", "--set", "sae.k=8", "--set", "data.max_docs=200") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "sae.k: 4 (saved) != 8 (given); data.max_docs: 300 (saved) != 200 (given)" in err
    assert cli(checkpoint, out, "--resume", "--set", "train.steps=3") == 2  # below the checkpoint's step 4
    assert "train.steps=3" in capsys.readouterr().err
    assert snapshot(out) == before  # nothing was written by a refused resume
    # the Python API refuses the same way
    with pytest.raises(ValueError, match=r"sae\.expansion: 2 \(saved\) != 3 \(given\)"):
        train_sae(checkpoint, out, load_sae_recipe(config, ["sae.expansion=3"]), resume=True, progress=False)
    assert snapshot(out) == before
    # where the token cache lives may change (the same tokens): this resume trains on
    (tmp_path / "x").mkdir()
    assert cli(checkpoint, out, "--resume", "--config", str(recipe_toml(tmp_path / "x"))) == 0
    assert read_train_state(out / "final").step == 12


def test_a_train_section_change_extends_a_finished_run_with_a_warning(checkpoint, tmp_path, capsys, caplog):
    config = recipe_toml(tmp_path, steps=6)
    out = tmp_path / "run"
    assert cli(checkpoint, out, "--config", str(config)) == 0
    with caplog.at_level(logging.WARNING, logger="bilinear_lens.sae.train"):
        assert cli(checkpoint, out, "--resume", "--set", "train.steps=9") == 0
    assert "holds a finished SAE (step 6); this run trains to step 9 and then replaces it" in caplog.text
    assert read_train_state(out / "final").step == 9
    assert json.loads((out / RECIPE_FILE).read_text())["train"]["steps"] == 9  # the new recipe is the run's now
    assert all(resume_may_change(f"train.{k}") for k in ("steps", "lr", "seed", "batch_size"))
    assert resume_may_change("data.cache_dir") and not resume_may_change("data.source")
    assert not resume_may_change("sae.hook") and not resume_may_change("sae.k")


def test_a_checkpoint_of_another_sae_is_refused_naming_the_config_field(checkpoint, tmp_path):
    """Without a saved recipe to compare (a run from before the file existed), the SAE in the
    checkpoint is still compared with the recipe's, one line, field by field."""
    config = recipe_toml(tmp_path)
    out = tmp_path / "run"
    train_sae(checkpoint, out, load_sae_recipe(config), progress=False, stop_at=4)
    (out / RECIPE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"has no {RECIPE_FILE}"):
        train_sae(checkpoint, out, None, resume=True, progress=False)
    post = load_sae_recipe(config, ["sae.hook=blocks.0.hook_resid_post", "sae.expansion=3"])
    with pytest.raises(ValueError) as err:
        train_sae(checkpoint, out, post, resume=True, progress=False)
    message = str(err.value)
    assert "\n" not in message and "SAEConfig(" not in message
    assert "d_sae: 64 (saved) != 96 (given)" in message
    assert "hook_name: 'blocks.0.hook_resid_mid' (saved) != 'blocks.0.hook_resid_post' (given)" in message


def test_resume_on_another_model_and_a_fresh_run_over_a_final_sae_are_refused(checkpoint, tmp_path):
    config = recipe_toml(tmp_path, steps=4)
    out = tmp_path / "run"
    train_sae(checkpoint, out, load_sae_recipe(config), progress=False)
    other = _save_model(tmp_path / "other", seed=1)  # same dims and tokenizer, other weights
    with pytest.raises(ValueError, match=re.escape(f"checkpoint: '{checkpoint}' (saved) != '{other}' (given)")):
        train_sae(other, out, None, resume=True, progress=False)
    shutil.copytree(checkpoint, tmp_path / "copy")  # the same model elsewhere is the same model
    assert train_sae(tmp_path / "copy", out, None, resume=True, progress=False).already_finished
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="already holds a finished SAE"):
        train_sae(checkpoint, out, load_sae_recipe(config), progress=False)
    assert snapshot(out) == before


def test_resume_without_checkpoint_uses_the_saved_model(checkpoint, tmp_path, capsys):
    """`sae train --out OUT --resume` (no --checkpoint) continues on the model named in
    OUT/sae_recipe.json; a new run still needs --checkpoint; a saved model that moved is named."""
    config = recipe_toml(tmp_path, steps=6)
    out = tmp_path / "run"
    rc = main(["sae", "train", "--out", str(out), "--config", str(config), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--checkpoint is required for a new run" in err
    assert not (out / RECIPE_FILE).exists()
    model = tmp_path / "model"
    shutil.copytree(checkpoint, model)
    assert cli(model, out, "--config", str(config), "--stop-at", "3") == 0
    capsys.readouterr()
    assert main(["sae", "train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "final SAE" in capsys.readouterr().out and read_train_state(out / "final").step == 6
    assert main(["sae", "train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "already finished at step 6" in capsys.readouterr().out
    shutil.rmtree(model)
    before = snapshot(out)
    assert main(["sae", "train", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"model checkpoint {model} saved in" in err and "no longer exists" in err
    assert cli(checkpoint, out, "--resume") == 0  # an explicit --checkpoint still works
    assert "already finished at step 6" in capsys.readouterr().out
    assert snapshot(out) == before


def test_recipe_differences_name_section_and_key():
    a, b = load_sae_recipe(None), load_sae_recipe(None, ["sae.k=8", "train.lr=1e-3"])
    assert recipe_differences(a, b) == [("sae.k", 30, 8), ("train.lr", 1e-4, 1e-3)]
    assert recipe_differences(a, a) == []


def test_help_has_plain_text_descriptions(capsys):
    texts = {}
    for argv, first in ((["sae", "--help"], "Sparse autoencoders (SAELens format) on a checkpoint's activations."),
                        (["sae", "train", "--help"], "Train a top-k SAE on one hook of a checkpoint")):
        with pytest.raises(SystemExit) as done:
            main(argv)
        texts[argv[-2]] = text = capsys.readouterr().out
        assert done.value.code == 0 and first in text, argv
        assert "``" not in text and ":mod:" not in text and ":func:" not in text, argv
    assert "--resume without --config continues with the" in texts["train"] and "OUT/sae_recipe.json" in texts["train"]
    assert build_parser().description.startswith("Sparse autoencoders")
