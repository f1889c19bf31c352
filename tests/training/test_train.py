"""Training loop: loss goes down, exact resume, NaN handling, checkpoints, config errors,
metrics, CLI, and 2-process DDP against single-process training.

Every run uses a tiny model (d_model 32) on a small synthetic corpus whose tokens are
cached once per session, so each ``train`` call takes about a second.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bilinear_lens import cli
from bilinear_lens.files.serialized import read_tensors, write_tensors
from bilinear_lens.training.state import (
    TrainState,
    capture_rng_state,
    read_train_state,
    restore_rng_state,
    write_train_state,
)
from bilinear_lens.training.config import RunConfig, TrainConfig, load_run_config
from bilinear_lens.data.corpus import prepare_data
from bilinear_lens.models.model import BilinearTransformer
from bilinear_lens.distributed import read_environment
from bilinear_lens.training.loop import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    METRICS_FILE,
    NonFiniteLossError,
    Trainer,
    TrainTask,
    learning_rate,
    list_checkpoints,
    train,
)
from bilinear_lens.training.run_dir import claim_run_dir
from conftest import REPO, recipe, run_config, state_dicts_equal

TINY_RECIPE = REPO / "training" / "configs" / "tiny.toml"


# --- learning and the run directory ---------------------------------------------------------


def test_loss_decreases_and_final_checkpoint_loads(cache_dir, tmp_path):
    result = train(run_config(cache_dir, steps=40, eval_every=20, eval_batches=4), tmp_path / "run", progress=False)
    first, last = result.metrics[0], result.metrics[-1]
    assert first["step"] == 0 and last["step"] == 40 == result.steps
    assert last["val_loss"] == pytest.approx(result.val_loss)
    # Untrained: about ln(d_vocab); trained: well below the context-free (unigram) optimum.
    model = BilinearTransformer.from_pretrained(result.final_checkpoint)
    assert first["val_loss"] == pytest.approx(math.log(model.cfg.d_vocab), abs=0.3)
    assert result.val_loss < result.unigram_entropy - 1.0
    assert result.final_checkpoint == tmp_path / "run" / FINAL_DIR
    assert model.cfg.d_vocab == model.tokenizer.backend_tokenizer.get_vocab_size()
    tokens = model.to_tokens("Lily found a ball.")
    assert model(tokens).shape == (1, tokens.shape[1], model.cfg.d_vocab)
    saved = load_run_config(result.final_checkpoint / "run_config.toml")
    assert saved.model == model.cfg and not saved.vocab_from_tokenizer


def test_metrics_jsonl(cache_dir, tmp_path):
    cfg = run_config(cache_dir, steps=10, log_every=3, eval_every=4)
    result = train(cfg, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert records == result.metrics
    # step 0 (baseline eval), every 3rd step, every 4th (eval), and the last step
    assert [r["step"] for r in records] == [0, 3, 4, 6, 8, 9, 10]
    keys = {"step", "train_loss", "val_loss", "lr", "tokens_per_s", "tokens", "elapsed_s"}
    assert all(set(r) == keys for r in records)
    assert [r["step"] for r in records if r["val_loss"] is not None] == [0, 4, 8, 10]
    for r in records[1:]:
        assert math.isfinite(r["train_loss"]) and r["tokens_per_s"] > 0
        assert r["tokens"] == r["step"] * 8 * 32
        assert r["lr"] == pytest.approx(learning_rate(r["step"] - 1, cfg.train, 10))
    assert all(a["elapsed_s"] <= b["elapsed_s"] for a, b in zip(records, records[1:]))


def test_learning_rate_schedules():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert learning_rate(0, cfg, 100) == pytest.approx(0.1)  # warmup: lr * 1/10
    assert learning_rate(9, cfg, 100) == pytest.approx(1.0)
    assert learning_rate(10, cfg, 100) == pytest.approx(1.0)
    assert learning_rate(99, cfg, 100) == pytest.approx(0.1)  # last update at min_lr
    assert learning_rate(10 + 89 / 2, cfg, 100) == pytest.approx(0.55)  # cosine midpoint
    linear = TrainConfig(steps=100, lr=1.0, min_lr=0.0, warmup_steps=0, schedule="linear")
    assert [learning_rate(s, linear, 101) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    constant = TrainConfig(steps=100, lr=0.5, warmup_steps=4, schedule="constant")
    assert [learning_rate(s, constant, 100) for s in (1, 4, 99)] == pytest.approx([0.25, 0.5, 0.5])


def test_keep_last_checkpoints_and_no_temp_dirs(cache_dir, tmp_path):
    train(run_config(cache_dir, steps=9, checkpoint_every=2, keep_last=2, eval_every=0), tmp_path, progress=False)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [8, 9]  # every 2 steps + the last
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS_DIR).iterdir()) == ["step_000008", "step_000009"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "final", "metrics.jsonl", "run_config.toml"]
    for directory in (tmp_path / CHECKPOINTS_DIR / "step_000009", tmp_path / FINAL_DIR):
        assert sorted(p.name for p in directory.iterdir()) == [
            "config.json", "model.safetensors", "run_config.toml", "tokenizer.json",
            "train_state.json", "train_state.safetensors",
        ]
    final = BilinearTransformer.from_pretrained(tmp_path / FINAL_DIR).state_dict()
    last = BilinearTransformer.from_pretrained(tmp_path / CHECKPOINTS_DIR / "step_000009").state_dict()
    assert state_dicts_equal(final, last)


# --- exact resume ---------------------------------------------------------------------------


def test_resume_is_bitwise_identical(cache_dir, tmp_path):
    """k steps, stop, resume to N == N steps straight: every weight, every AdamW moment."""
    cfg = run_config(cache_dir, steps=12, grad_accum=2, eval_every=5, checkpoint_every=4)
    straight = train(cfg, tmp_path / "straight", progress=False)
    stopped = train(cfg, tmp_path / "resumed", progress=False, stop_at=6)
    assert not stopped.finished and stopped.steps == 6
    assert stopped.final_checkpoint == tmp_path / "resumed" / CHECKPOINTS_DIR / "step_000006"
    assert not (tmp_path / "resumed" / FINAL_DIR).exists()
    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.finished and resumed.steps == 12

    a = BilinearTransformer.from_pretrained(straight.final_checkpoint).state_dict()
    b = BilinearTransformer.from_pretrained(resumed.final_checkpoint).state_dict()
    assert state_dicts_equal(a, b)
    opt_a = read_train_state(straight.final_checkpoint).optimizer
    opt_b = read_train_state(resumed.final_checkpoint).optimizer
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for index in opt_a["state"]:
        assert state_dicts_equal(opt_a["state"][index], opt_b["state"][index])
    assert resumed.val_loss == straight.val_loss
    # The metrics log continues without duplicates and matches the straight run's losses.
    assert [r["step"] for r in resumed.metrics] == [r["step"] for r in straight.metrics]
    assert [r["train_loss"] for r in resumed.metrics] == [r["train_loss"] for r in straight.metrics]


def test_resume_from_explicit_checkpoint_and_model_mismatch(cache_dir, tmp_path):
    cfg = run_config(cache_dir, steps=6, checkpoint_every=3, eval_every=0)
    train(cfg, tmp_path / "a", progress=False)
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train(cfg, tmp_path / "a", progress=False)
    longer = run_config(cache_dir, steps=8, checkpoint_every=3, eval_every=0)
    result = train(longer, tmp_path / "b", resume=tmp_path / "a" / CHECKPOINTS_DIR / "step_000003", progress=False)
    assert result.steps == 8 and result.metrics[0]["step"] > 3  # the log starts where b did
    other = RunConfig.from_dict({**recipe(cache_dir), "model": {**recipe(cache_dir)["model"], "d_mlp": 32}})
    with pytest.raises(ValueError, match=r"model config differs .*'d_mlp': \(64, 32\)"):
        train(other, tmp_path / "a", resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        train(cfg, tmp_path / "empty", resume=True, progress=False)


def snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``run_dir``: its bytes and modification time (ns)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_trains_evaluates_and_writes_nothing(cache_dir, tmp_path, capsys, monkeypatch):
    cfg = run_config(cache_dir, steps=4, eval_every=2, checkpoint_every=2)
    out = tmp_path / "run"
    first = train(cfg, out, progress=False)
    before = snapshot(out)
    import bilinear_lens.training.loop as loop

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    with monkeypatch.context() as patch:
        patch.setattr(loop.Trainer, "fit", no_training)
        patch.setattr(loop, "evaluate", no_training)
        result = train(cfg, out, resume=True, progress=False)
        assert result.already_finished and result.finished and result.steps == 4
        assert result.final_checkpoint == out / FINAL_DIR and result.val_loss == first.val_loss
        assert result.metrics == first.metrics and result.unigram_entropy == first.unigram_entropy
        args = ["train", "--out", str(out), "--resume", "--no-progress"]
        assert cli.main(args) == 0
        assert "already finished at step 4" in capsys.readouterr().out
    assert snapshot(out) == before  # not a byte, not a touch
    extended = train(run_config(cache_dir, steps=6, eval_every=2, checkpoint_every=2), out, resume=True, progress=False)
    assert not extended.already_finished and extended.steps == 6 and read_train_state(out / FINAL_DIR).step == 6


# --- the Trainer with another model and loss ------------------------------------------------


def unit_weight_hooks(model: torch.nn.Linear, calls: list[int]) -> dict:
    """TrainTask's optional hooks for a constrained model: after each step the weight goes
    back to unit norm and the step is noted; the count of steps is task state that a
    checkpoint carries; records show the weight's norm and the count."""

    def after_step(step: int) -> None:
        with torch.no_grad():
            model.weight /= model.weight.norm()
        calls.append(step)

    return dict(after_step=after_step, data_state=lambda step: {"next_step": step, "after_steps": len(calls)},
                load_data_state=lambda data: calls.extend(range(1, data["after_steps"] + 1)),
                record_fields=lambda evaluated: {"weight_norm": float(model.weight.detach().norm()),
                                                 "after_steps": len(calls), "last_after_step": calls[-1]},
                baseline_eval=False)


def train_least_squares(out_dir: Path, stop_at=None, resume=None, constrained=False) -> tuple[Trainer, Path]:
    """A second trainer on the same machinery: a linear model, squared error, its own files
    (``constrained``: with :func:`unit_weight_hooks`)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 6, generator=gen)  # [x (5) | y (1)]
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    if resume is not None:
        model.load_state_dict(read_tensors(resume / "weights.safetensors"))
    calls: list[int] = []
    hooks = unit_weight_hooks(model, calls) if constrained else {"data_state": lambda step: {"next_step": step}}
    task = TrainTask(
        model=model,
        batch=lambda step: rows[(step % 8) * 8:(step % 8 + 1) * 8],
        loss=lambda module, batch: ((module(batch[:, :5]) - batch[:, 5:]) ** 2).mean(),
        evaluate=lambda: float(((model(rows[:, :5]) - rows[:, 5:]) ** 2).mean().detach()),
        write_model_files=lambda directory: write_tensors(directory / "weights.safetensors", model.state_dict()),
        tokens_per_step=8,
        **hooks,
    )
    cfg = TrainConfig(steps=10, batch_size=8, grad_accum=2, lr=0.05, warmup_steps=0, log_every=2, eval_every=5,
                      checkpoint_every=3, device="cpu")
    with claim_run_dir(out_dir, writer=True):
        trainer = Trainer(task, torch.optim.AdamW(model.parameters(), lr=cfg.lr), cfg, cfg.steps,
                          read_environment("cpu"), out_dir, resume_from=resume, progress=False)
        return trainer, trainer.fit(stop_at)


def test_trainer_trains_another_model_and_resumes_bitwise(tmp_path):
    straight, final = train_least_squares(tmp_path / "straight")
    assert final == tmp_path / "straight" / FINAL_DIR and straight.finished
    assert straight.log.records[-1]["val_loss"] < straight.log.records[0]["val_loss"]
    _, stopped = train_least_squares(tmp_path / "resumed", stop_at=4)
    resumed, _ = train_least_squares(tmp_path / "resumed", resume=stopped)
    a = read_tensors(tmp_path / "straight" / FINAL_DIR / "weights.safetensors")
    b = read_tensors(tmp_path / "resumed" / FINAL_DIR / "weights.safetensors")
    assert state_dicts_equal(a, b)
    assert [r["train_loss"] for r in resumed.log.records] == [r["train_loss"] for r in straight.log.records]
    assert read_train_state(tmp_path / "resumed" / FINAL_DIR).data == {"next_step": 10}


def test_trainer_task_hooks_constrain_every_step_and_their_state_resumes(tmp_path):
    """after_step runs once per update (steps 1..N) before anything is logged or saved;
    load_data_state gets the checkpoint's data_state; record_fields extend each record;
    baseline_eval=False leaves out the step-0 record."""
    straight, _ = train_least_squares(tmp_path / "straight", constrained=True)
    records = straight.log.records
    assert [r["step"] for r in records] == [2, 4, 5, 6, 8, 10]
    assert [r["after_steps"] for r in records] == [r["last_after_step"] for r in records] == [r["step"] for r in records]
    assert all(abs(r["weight_norm"] - 1) < 1e-6 for r in records)  # float32 rounding of a unit vector
    saved = read_tensors(tmp_path / "straight" / FINAL_DIR / "weights.safetensors")["weight"]
    assert abs(float(saved.norm()) - 1) < 1e-6
    _, stopped = train_least_squares(tmp_path / "resumed", stop_at=4, constrained=True)
    assert read_train_state(stopped).data == {"next_step": 4, "after_steps": 4}
    resumed, _ = train_least_squares(tmp_path / "resumed", resume=stopped, constrained=True)
    keys = ("step", "train_loss", "val_loss", "lr", "tokens", "weight_norm", "after_steps")
    assert [[r[k] for k in keys] for r in resumed.log.records] == [[r[k] for k in keys] for r in records]
    a = read_tensors(tmp_path / "straight" / FINAL_DIR / "weights.safetensors")
    b = read_tensors(tmp_path / "resumed" / FINAL_DIR / "weights.safetensors")
    assert state_dicts_equal(a, b)


# --- divergence ----------------------------------------------------------------------------


def test_non_finite_loss_stops_and_keeps_last_checkpoint(cache_dir, tmp_path, monkeypatch):
    import bilinear_lens.training.loop as train_module

    calls = {"n": 0}
    real_loss = train_module.compute_loss

    def loss_that_diverges(model, block, reduction="mean"):
        loss = real_loss(model, block, reduction)
        if model.training:
            calls["n"] += 1
            if calls["n"] >= 5:  # the 5th training step
                return loss * float("nan")
        return loss

    monkeypatch.setattr(train_module, "compute_loss", loss_that_diverges)
    cfg = run_config(cache_dir, steps=10, checkpoint_every=3, eval_every=0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at step 5") as err:
        train(cfg, tmp_path, progress=False)
    good = tmp_path / CHECKPOINTS_DIR / "step_000003"
    assert err.value.step == 5 and err.value.last_checkpoint == good
    assert str(good) in str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3]
    assert not (tmp_path / FINAL_DIR).exists()
    model = BilinearTransformer.from_pretrained(good)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert read_train_state(good).step == 3
    # The run can continue from the good checkpoint once the cause is fixed.
    monkeypatch.setattr(train_module, "compute_loss", real_loss)
    assert train(cfg, tmp_path, resume=True, progress=False).steps == 10


# --- errors before training --------------------------------------------------------------------


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_errors_name_key_section_file(tmp_path):
    bad = write_recipe(tmp_path / "bad.toml", "[model]\nd_model = 32\n[train]\nlrr = 0.1\n")
    with pytest.raises(ValueError) as err:
        load_run_config(bad)
    message = str(err.value)
    assert "'lrr'" in message and "[train]" in message and str(bad) in message and "allowed keys" in message
    assert "'lr'" in message

    with pytest.raises(ValueError, match=r"unknown section\(s\) \['optim'\]"):
        load_run_config(write_recipe(tmp_path / "s.toml", "[optim]\nlr = 1\n"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['d_modle'\] in section \[model\] of .*m\.toml"):
        load_run_config(write_recipe(tmp_path / "m.toml", "[model]\nd_modle = 32\n"))

    good = write_recipe(tmp_path / "good.toml", "[model]\nd_model = 32\nn_heads = 2\n")
    with pytest.raises(ValueError) as err:
        load_run_config(good, ["train.learning_rate=3e-4"])
    message = str(err.value)
    assert "'learning_rate'" in message and "[train]" in message and str(good) in message and "'lr'" in message
    with pytest.raises(ValueError, match="section.key=value"):
        load_run_config(good, ["lr"])

    with pytest.raises(ValueError, match=r"TrainConfig\.schedule='cos' is invalid: allowed values are \['cosine'"):
        load_run_config(good, ["train.schedule=cos"])
    with pytest.raises(ValueError, match=r"ModelConfig\.mlp_kind='tanh' is invalid: allowed values"):
        load_run_config(good, ["model.mlp_kind=tanh"])
    with pytest.raises(ValueError, match=r"TrainConfig\.lr=-1 is invalid: must be a positive number"):
        load_run_config(good, ["train.lr=-1"])
    with pytest.raises(ValueError, match=r"exactly one of train\.steps and train\.epochs"):
        load_run_config(good, ["train.steps=10", "train.epochs=2"])
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_run_config(tmp_path / "nope.toml")


def test_overrides_parse_toml_literals_and_bare_strings(tmp_path):
    cfg = load_run_config(TINY_RECIPE, ["train.lr=3e-4", "model.mlp_kind=relu", 'data.source="x.txt"',
                                        "train.epochs=2", "train.steps=0", "data.streaming=true"])
    assert cfg.train.lr == 3e-4 and cfg.model.mlp_kind == "relu" and cfg.data.source == "x.txt"
    assert cfg.train.epochs == 2 and cfg.train.steps == 0 and cfg.data.streaming is True
    assert cfg.vocab_from_tokenizer  # the tiny recipe leaves d_vocab to the tokenizer
    # The resolved TOML reads back to the same config.
    again = load_run_config(write_recipe(tmp_path / "r.toml", cfg.to_toml()))
    assert (again.model, again.data, again.train) == (cfg.model, cfg.data, cfg.train)
    assert again.vocab_from_tokenizer


def test_bad_inputs_fail_before_training(cache_dir, tmp_path):
    with pytest.raises(ValueError, match=r"batch_size=9 .* divisible by world_size \* train.grad_accum = 1 \* 2"):
        train(run_config(cache_dir, batch_size=9, grad_accum=2), tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()

    def with_data(**data) -> RunConfig:
        base = recipe(cache_dir)
        return RunConfig.from_dict({**base, "data": {**base["data"], **data}})

    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train(with_data(source=str(tmp_path / "missing.txt")), tmp_path / "b", progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="empty corpus"):
        train(with_data(source=str(empty), cache_dir=str(tmp_path / "c1")), tmp_path / "c", progress=False)
    short = tmp_path / "short.txt"
    short.write_text("A cat.\n\nA dog.\n")
    with pytest.raises(ValueError, match="n_ctx=32 is too large"):
        train(with_data(source=str(short), val_fraction=0.0, cache_dir=str(tmp_path / "c2"), tokenizer_train_docs=0),
              tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match=r"batch_size=100000 exceeds"):
        train(run_config(cache_dir, batch_size=100_000), tmp_path / "e", progress=False)
    small_vocab = RunConfig.from_dict({**recipe(cache_dir), "model": {**recipe(cache_dir)["model"], "d_vocab": 300}})
    with pytest.raises(ValueError, match=r"model\.d_vocab=300 .* smaller than the tokenizer"):
        train(small_vocab, tmp_path / "f", progress=False)


# --- training state files ------------------------------------------------------------------------


def test_train_state_files_are_plain_data(tmp_path):
    model = torch.nn.Linear(3, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    write_train_state(tmp_path, TrainState(step=7, optimizer=optimizer.state_dict(), data={"next_step": 7},
                                           rng=capture_rng_state()))
    tensors = read_tensors(tmp_path / "train_state.safetensors")
    assert {"optimizer.state.0.exp_avg", "optimizer.state.1.exp_avg_sq", "optimizer.state.0.step", "rng.torch"} <= set(tensors)
    meta = json.loads((tmp_path / "train_state.json").read_text())
    assert meta["step"] == 7 and meta["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.95]

    expected = (torch.rand(3), __import__("random").random())
    state = read_train_state(tmp_path)
    restore_rng_state(state.rng)
    assert torch.equal(torch.rand(3), expected[0]) and __import__("random").random() == expected[1]
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    fresh.load_state_dict(state.optimizer)
    assert fresh.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for index, values in optimizer.state_dict()["state"].items():
        assert state_dicts_equal(values, fresh.state_dict()["state"][index])


# --- command line ----------------------------------------------------------------------------------


def test_cli_trains_tiny_recipe_override(cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    data = recipe(cache_dir)["data"]
    args = ["train", "--config", str(TINY_RECIPE), "--out", str(out), "--no-progress", "--quiet",
            "--set", "model.d_model=32", "--set", "model.n_layers=1", "--set", "model.d_mlp=64",
            "--set", "model.n_ctx=32", "--set", "data.vocab_size=400", "--set", f"data.max_docs={data['max_docs']}",
            "--set", "data.val_fraction=0.1", "--set", f"data.tokenizer_train_docs={data['tokenizer_train_docs']}",
            "--set", f'data.cache_dir="{cache_dir}"', "--set", "train.steps=8", "--set", "train.batch_size=8",
            "--set", "train.warmup_steps=2", "--set", "train.checkpoint_every=4", "--set", "train.eval_batches=2"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert f"final checkpoint: {out / FINAL_DIR}" in printed
    assert "val loss" in printed and "nats vs unigram entropy" in printed
    model = BilinearTransformer.from_pretrained(out / FINAL_DIR)
    assert model.cfg.d_model == 32 and model.cfg.mlp_kind == "bilinear"
    assert isinstance(model.generate("Lily", max_new_tokens=3, temperature=0), str)

    # --resume without --config reads the run's resolved recipe; --set extends it.
    assert cli.main(["train", "--out", str(out), "--resume", "--no-progress", "--quiet", "--set", "train.steps=10"]) == 0
    assert read_train_state(out / FINAL_DIR).step == 10

    assert cli.main(["train", "--config", str(TINY_RECIPE), "--out", str(tmp_path / "x"), "--set", "train.lrr=1"]) == 2  # a usage/recipe error
    err = capsys.readouterr().err
    assert "unknown key 'lrr' in section [train]" in err and "tiny.toml" in err


# --- multi-process --------------------------------------------------------------------------------


def test_two_process_ddp_matches_single_process(cache_dir, tmp_path):
    """torchrun with 2 gloo processes: runs, only rank 0 writes, same weights as 1 process.

    The two runs sum the same per-token gradients in a different order (2 ranks x 2
    micro-batches of 2 blocks, all-reduced, vs 2 micro-batches of 4), so they agree up to
    float rounding, which AdamW can amplify: its update ``lr * m / (sqrt(v) + eps)`` has
    slope up to ``lr / eps = 1e6`` in the gradient where the gradient is ~0. In float32
    that turns rounding (~1e-7) into weight differences of ~1e-5 after a few steps, which
    is why the model runs in float64 here: rounding ~1e-16 * 1e6 per step, over 6 steps,
    stays far below the 1e-8 bound used below (measured: ~1e-14) while any real error (a
    missed all-reduce, a wrong batch share, a double-counted micro-batch) changes weights
    by ~lr = 1e-2.
    """
    base = recipe(cache_dir, steps=6, grad_accum=2, checkpoint_every=3, eval_every=3)
    base["model"]["dtype"] = "float64"
    cfg = RunConfig.from_dict(base, where="test recipe")
    single = train(cfg, tmp_path / "single", progress=False)
    config_path = tmp_path / "recipe.toml"
    cfg.save_toml(config_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "bilinear_lens.cli", "train", "--config", str(config_path), "--out", str(tmp_path / "ddp"),
         "--no-progress", "--quiet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("final checkpoint:") == 1  # only rank 0 reports

    ddp_dir = tmp_path / "ddp"
    assert sorted(p.name for p in ddp_dir.iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert [s for s, _ in list_checkpoints(ddp_dir)] == [3, 6]
    records = [json.loads(line) for line in (ddp_dir / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [r["step"] for r in single.metrics]  # written once, by rank 0
    for r_ddp, r_single in zip(records[1:], single.metrics[1:]):
        # compute_loss takes the cross-entropy in float32 and the ranks' means are averaged
        # in another order: float32 rounding, ~1e-7 relative.
        assert r_ddp["train_loss"] == pytest.approx(r_single["train_loss"], rel=1e-6)
    assert read_train_state(ddp_dir / FINAL_DIR).data["world_size"] == 2

    a = BilinearTransformer.from_pretrained(single.final_checkpoint).state_dict()
    b = BilinearTransformer.from_pretrained(ddp_dir / FINAL_DIR).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == torch.float64
        # Bound from the docstring: float64 rounding amplified by AdamW, << 1e-8 << lr.
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-8, msg=key)
