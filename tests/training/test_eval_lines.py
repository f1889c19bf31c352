"""Every evaluation is one line on stderr (issue 25 audit: off a terminal only the final val
loss was logged, so a long run's validation curve was invisible until it ended)."""

from __future__ import annotations

import logging
import re

from bilinear_lens.training.config import RunConfig
from bilinear_lens.training.loop import evaluation_line, train


def _recipe(cache_dir, steps: int = 6, eval_every: int = 2) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_mlp": 64, "n_ctx": 16, "seed": 0},
        "data": {"source": "synthetic", "vocab_size": 300, "max_docs": 300, "val_fraction": 0.2,
                 "cache_dir": str(cache_dir)},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-2, "log_every": 0, "eval_every": eval_every,
                  "checkpoint_every": 3, "device": "cpu", "num_threads": 1},
    }, where="test recipe")


def _step_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]


def test_each_evaluation_logs_one_line_with_the_metrics_record_values(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bilinear_lens")
    result = train(_recipe(tmp_path / "cache"), tmp_path / "run", progress=False)
    lines = _step_lines(caplog)
    val = {r["step"]: r["val_loss"] for r in result.metrics if r.get("val_loss") is not None}
    assert sorted(val) == [0, 2, 4, 6]
    assert lines[0] == f"step 0/6: val loss {val[0]:.4f} (untrained)"
    for line, step in zip(lines[1:3], (2, 4)):
        assert re.fullmatch(rf"step {step}/6: val loss {val[step]:.4f} \(train loss \d+\.\d{{4}}, [\d.e-]+ s/step\)",
                            line), line
    # the last step: one line, the trainer's own (with its checkpoint), not a second evaluation line
    assert lines[3:] == [f"step 6: val loss {val[6]:.4f}; checkpoint {result.final_checkpoint}"]


def test_a_stop_at_evaluation_is_reported_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="bilinear_lens")
    train(_recipe(tmp_path / "cache"), tmp_path / "run", progress=False, stop_at=4)
    lines = _step_lines(caplog)
    assert [line.split(":")[0] for line in lines] == ["step 0/6", "step 2/6", "step 4"]


def test_evaluation_line_prefers_a_tasks_own_held_out_metrics():
    fields = {"val_mse": 0.000576, "val_explained_variance": 0.91, "mse": 0.1, "dead_fraction": 0.0}
    assert evaluation_line(20, 40, 0.5, fields, 0.036, 0.004) == \
        "step 20/40: val_mse 0.000576, val_explained_variance 0.91 (train loss 0.0360, 0.004 s/step)"
    assert evaluation_line(5, 10, None, {}, None, None) == "step 5/10: val loss none (no val split)"


def test_the_sae_trainer_logs_its_held_out_metrics_per_evaluation(tmp_path, caplog):
    from bilinear_lens.sae.recipe import load_sae_recipe
    from bilinear_lens.sae.train import train_sae

    model = train(_recipe(tmp_path / "cache", steps=2, eval_every=0), tmp_path / "run", progress=False)
    recipe = load_sae_recipe(None, ["sae.hook=\"blocks.0.hook_resid_mid\"", "sae.expansion=2", "sae.k=4",
                                    "train.steps=4", "train.eval_every=2", "train.batch_size=4", "train.log_every=0",
                                    "train.device=\"cpu\"", "train.num_threads=1"])
    caplog.set_level(logging.INFO, logger="bilinear_lens")
    result = train_sae(model.final_checkpoint, tmp_path / "sae", recipe, progress=False)
    [line] = _step_lines(caplog)  # step 4 is the end: the CLI's final report covers it
    record = next(r for r in result.metrics if r["step"] == 2)
    assert line.startswith(f"step 2/4: val_mse {record['val_mse']:.4g}, "
                           f"val_explained_variance {record['val_explained_variance']:.4g}")


def test_a_stop_between_evaluations_says_which_step_its_val_loss_is_from(tmp_path, caplog, capsys):
    """Before: ``--stop-at 3`` with ``eval_every 2`` printed step 2's val loss as ``(step 3)``."""
    from bilinear_lens.commands.train import main
    from bilinear_lens.training.state import read_train_state

    caplog.set_level(logging.INFO, logger="bilinear_lens")
    result = train(_recipe(tmp_path / "cache"), tmp_path / "run", progress=False, stop_at=3)
    assert (result.steps, result.val_step) == (3, 2)
    assert result.val_loss == next(r["val_loss"] for r in result.metrics if r["step"] == 2)
    assert _step_lines(caplog)[-1] == (f"step 3: val loss {result.val_loss:.4f} (evaluated at step 2); "
                                       f"checkpoint {result.final_checkpoint}")
    assert read_train_state(result.final_checkpoint).metrics["val_step"] == 2
    # resumed: the step travels with the checkpoint; the run's end evaluates its own last step
    resumed = train(_recipe(tmp_path / "cache"), tmp_path / "run", resume=True, progress=False, stop_at=5)
    assert (resumed.steps, resumed.val_step) == (5, 4)
    finished = train(_recipe(tmp_path / "cache"), tmp_path / "run", resume=True, progress=False)
    assert (finished.steps, finished.val_step) == (6, 6)
    again = train(_recipe(tmp_path / "cache"), tmp_path / "run", resume=True, progress=False)
    assert again.already_finished and again.val_step == 6


def test_the_cli_summary_names_the_evaluated_step(tmp_path, capsys):
    from bilinear_lens.commands.train import main

    config = tmp_path / "r.toml"
    config.write_text(_recipe(tmp_path / "cache").to_toml(), encoding="utf-8")
    assert main(["--config", str(config), "--out", str(tmp_path / "run"), "--stop-at", "3", "--no-progress"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("nats (step 2, the last evaluation before step 3)"), last
