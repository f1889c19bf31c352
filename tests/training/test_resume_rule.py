"""One resume rule for both trainers (issue #22 item 6, issue #24 item 3): a resumed model
run refuses another ``[data]`` (other batches) and a ``train.steps`` below its checkpoint's
step (it would publish an unfinished run as final), naming the field, as ``sae train`` does;
the rule, the formatter and the steps check are one module both trainers import."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from bilinear_lens import cli
from bilinear_lens.data.corpus import prepare_data
from bilinear_lens.training import resume_rule
from bilinear_lens.training.config import DataConfig, RunConfig, TrainConfig
from bilinear_lens.training.loop import CHECKPOINTS_DIR, FINAL_DIR, RUN_CONFIG_FILE, train
from bilinear_lens.training.state import TrainState, write_train_state
from bilinear_lens.training.resume_rule import (
    check_steps_reach,
    field_differences,
    format_differences,
    refused_differences,
    resume_may_change,
    section_differences,
)

DATA = {"source": "synthetic", "vocab_size": 300, "max_docs": 400, "val_fraction": 0.1, "tokenizer_train_docs": 400}


def recipe(cache_dir: Path, data: dict | None = None, **train) -> dict:
    return {
        "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_mlp": 32, "n_ctx": 16, "seed": 0},
        "data": {**DATA, "cache_dir": str(cache_dir), **(data or {})},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "log_every": 2, "eval_every": 0,
                  "checkpoint_every": 2, "keep_last": 3, "device": "cpu", "num_threads": 1, **train},
    }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("resume_rule_cache")
    prepare_data("synthetic", vocab_size=DATA["vocab_size"], n_ctx=16, cache_dir=path, val_fraction=DATA["val_fraction"],
                 max_docs=DATA["max_docs"], tokenizer_train_docs=DATA["tokenizer_train_docs"])
    return path


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture
def stopped_run(cache_dir, tmp_path) -> Path:
    """A run of 6 steps stopped (as if preempted) at step 4, with a checkpoint there."""
    out = tmp_path / "run"
    result = train(RunConfig.from_dict(recipe(cache_dir), where="first recipe"), out, progress=False, stop_at=4)
    assert result.steps == 4 and not result.finished
    return out


def test_model_resume_with_other_data_is_refused_naming_the_field(cache_dir, stopped_run):
    before = snapshot(stopped_run)
    other = RunConfig.from_dict(recipe(cache_dir, data={"max_docs": 300}), where="other recipe")
    ckpt = stopped_run / CHECKPOINTS_DIR / "step_000004"
    message = (f"cannot resume from {ckpt}: the recipe (other recipe) differs from the checkpoint's "
               f"({ckpt / RUN_CONFIG_FILE}) in data.max_docs: 400 (saved) != 300 (given); on resume only [train] "
               "values and data.cache_dir may change")
    with pytest.raises(ValueError, match=re.escape(message)):
        train(other, stopped_run, resume=True, progress=False)
    source = RunConfig.from_dict(recipe(cache_dir, data={"source": "other.txt"}), where="other recipe")
    given = Path("other.txt").resolve()  # a local source is compared (and named) as the absolute path it records
    with pytest.raises(ValueError, match=re.escape(f"data.source: 'synthetic' (saved) != '{given}' (given)")):
        train(source, stopped_run, resume=True, progress=False)
    assert snapshot(stopped_run) == before  # refused before anything was written


def test_model_resume_with_steps_below_the_checkpoint_is_refused_not_published(cache_dir, stopped_run):
    before = snapshot(stopped_run)
    fewer = RunConfig.from_dict(recipe(cache_dir, steps=3), where="fewer steps")
    ckpt = stopped_run / CHECKPOINTS_DIR / "step_000004"
    with pytest.raises(ValueError, match=re.escape(f"train.steps=3 in fewer steps is below step 4 of {ckpt}: a resumed "
                                                   "run trains on from its checkpoint")):
        train(fewer, stopped_run, resume=True, progress=False)
    assert not (stopped_run / FINAL_DIR).exists() and snapshot(stopped_run) == before
    # the same step count the checkpoint holds (4) is allowed: it finishes the run there
    done = train(RunConfig.from_dict(recipe(cache_dir, steps=4)), stopped_run, resume=True, progress=False)
    assert done.finished and done.steps == 4 and (stopped_run / FINAL_DIR).is_dir()


def test_cli_train_resume_with_fewer_steps_exits_2_and_keeps_the_run(cache_dir, stopped_run, capsys):
    before = snapshot(stopped_run)
    code = cli.main(["train", "--out", str(stopped_run), "--resume", "--set", "train.steps=3", "--quiet",
                     "--no-progress"])
    assert code == 2
    assert "train.steps=3 in " in capsys.readouterr().err
    assert snapshot(stopped_run) == before  # run_config.toml still says steps = 6


def test_model_resume_may_change_train_values(cache_dir, stopped_run):
    more = RunConfig.from_dict(recipe(cache_dir, steps=8, lr=5e-3), where="more steps")
    result = train(more, stopped_run, resume=True, progress=False)
    assert result.finished and result.steps == 8


def test_rule_allows_train_and_cache_dir_only():
    assert all(resume_may_change(f"train.{f.name}") for f in dataclasses.fields(TrainConfig))
    data_keys = [f.name for f in dataclasses.fields(DataConfig)]
    assert [k for k in data_keys if resume_may_change(f"data.{k}")] == ["cache_dir"]
    assert not any(resume_may_change(f"{section}.d_model") for section in ("model", "sae"))


def test_differences_and_their_one_line_format():
    saved = RunConfig.from_dict({"data": {"max_docs": 5, "cache_dir": "a"}, "train": {"lr": 1e-3}})
    given = RunConfig.from_dict({"data": {"max_docs": 6, "cache_dir": "b"}, "train": {"lr": 2e-3}})
    assert field_differences(saved.data, given.data) == [("max_docs", 5, 6), ("cache_dir", "a", "b")]
    assert section_differences(saved, given, ("data", "train")) == [
        ("data.max_docs", 5, 6), ("data.cache_dir", "a", "b"), ("train.lr", 1e-3, 2e-3)]
    assert refused_differences(saved, given, ("data", "train")) == [("data.max_docs", 5, 6)]
    assert format_differences([("data.max_docs", 5, 6), ("x", "a", "b")]) == \
        "data.max_docs: 5 (saved) != 6 (given); x: 'a' (saved) != 'b' (given)"
    check_steps_reach(4, 4, "r", "ckpt")  # equal is fine
    with pytest.raises(ValueError, match=re.escape("train.epochs=0.5 (3 steps) in r is below step 4 of ckpt")):
        check_steps_reach(3, 4, "r", "ckpt", setting="train.epochs=0.5 (3 steps)")


def test_both_trainers_use_the_one_rule():
    from bilinear_lens.sae import train as sae_train
    from bilinear_lens.training import loop

    for module in (loop, sae_train):
        for name in ("format_differences", "check_steps_reach"):
            assert getattr(module, name) is getattr(resume_rule, name), (module.__name__, name)
    assert sae_train.resume_may_change is resume_rule.resume_may_change


def _state_at(directory: Path, step: int) -> Path:
    directory.mkdir(parents=True)
    write_train_state(directory, TrainState(step=step, optimizer={"state": {}, "param_groups": []}))
    return directory


@pytest.mark.parametrize("ckpt_step, final_step, total, finished", [
    (10, 10, 10, True),    # at the end of the schedule with final/ of that step: nothing to train
    (10, 10, 20, False),   # the schedule was extended: train on
    (10, None, 10, False),  # killed after the last checkpoint, before final/: write it
    (10, 5, 10, False),    # final/ of an older schedule: replace it
])
def test_finished_final_is_the_one_finished_rule_of_both_trainers(tmp_path, ckpt_step, final_step, total, finished):
    ckpt = _state_at(tmp_path / CHECKPOINTS_DIR / "step_000010", ckpt_step)
    if final_step is not None:
        _state_at(tmp_path / FINAL_DIR, final_step)
    assert resume_rule.finished_final(tmp_path, ckpt, total) == (tmp_path / FINAL_DIR if finished else None)
