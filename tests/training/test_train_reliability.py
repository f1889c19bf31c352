"""Training reliability (issue 14): one writer per run directory and token cache, a
divergence guard whose advice resumes, kill-safe metrics.jsonl, cleanup of dead writers'
temporaries, files that follow the umask. Concurrency is tested with real processes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bilinear_lens import cli
from bilinear_lens.locking import LockHeldError
from bilinear_lens.files.atomic import atomic_write_text
from bilinear_lens.files.serialized import read_tensors
from bilinear_lens.models.model import BilinearTransformer, build_model
from bilinear_lens.training.guard import DivergenceGuard
from bilinear_lens.training.loop import CHECKPOINTS_DIR, FINAL_DIR, METRICS_FILE, NonFiniteLossError, train
from bilinear_lens.training.metrics import read_metrics
from bilinear_lens.training.run_dir import LOCK_FILE, list_checkpoints
from conftest import tiny_config
from conftest import REPO, recipe, run_config, state_dicts_equal


def python_process(code: str, *args: str) -> subprocess.Popen:
    """A real second process running ``code`` with this worktree's package."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def dead_pid() -> int:
    """The pid of a process that has exited (pids are not reused within seconds)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- issue 14.1: one writer per run directory, one per cache entry ----------------------------


HOLD_RUN_DIR = """
    import sys
    from pathlib import Path
    from bilinear_lens.training.run_dir import claim_run_dir
    with claim_run_dir(Path(sys.argv[1]), writer=True):
        print("locked", flush=True)
        sys.stdin.read()  # hold until killed or stdin closes
"""


def test_second_writer_of_a_run_dir_is_refused_naming_the_holder(cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    holder = python_process(HOLD_RUN_DIR, str(out))
    assert holder.stdout.readline().strip() == "locked"
    cfg = run_config(cache_dir, steps=4, eval_every=0)
    with pytest.raises(LockHeldError) as err:
        train(cfg, out, progress=False)
    message = str(err.value)
    assert f"run directory {out} is in use by pid {holder.pid} on host {socket.gethostname()} since 20" in message
    assert "\n" not in message and not list_checkpoints(out)
    # The CLI prints that one line and exits 2, like every refused run directory or recipe.
    cfg.save_toml(tmp_path / "recipe.toml")
    assert cli.main(["train", "--config", str(tmp_path / "recipe.toml"), "--out", str(out), "--quiet"]) == 2
    assert f"is in use by pid {holder.pid}" in capsys.readouterr().err

    holder.send_signal(signal.SIGKILL)  # kill -9 leaves the lock file behind: stale, not held
    holder.wait()
    assert (out / LOCK_FILE).is_file()
    assert train(cfg, out, progress=False).steps == 4
    assert not (out / LOCK_FILE).exists()  # released on exit


@pytest.mark.slow  # ~30 s on 2 busy cores: two CLI processes import torch and train
def test_two_concurrent_trainings_never_mix(cache_dir, tmp_path):
    """The issue's reproduction: two CLI trainings into one --out, different seeds, at once.
    One finishes; the other is refused (lock held, or, if it started after the first
    finished, the checkpoints already there); the run directory is the winner's alone."""
    out = tmp_path / "same"
    procs = []
    for seed in (1, 2):
        cfg = run_config(cache_dir, steps=20, checkpoint_every=5, eval_every=0, seed=seed)
        cfg.save_toml(tmp_path / f"recipe{seed}.toml")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bilinear_lens.cli", "train", "--config", str(tmp_path / f"recipe{seed}.toml"),
             "--out", str(out), "--no-progress", "--quiet"],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results  # 2: the run directory was refused
    winner = 1 + [code for code, _ in results].index(0)
    loser_err = [err for code, err in results if code == 2][0]
    assert "is in use by pid" in loser_err or "already holds checkpoints" in loser_err
    assert f"seed = {winner}" in (out / "run_config.toml").read_text()
    for _, path in list_checkpoints(out) + [(None, out / FINAL_DIR)]:
        assert json.loads((path / "train_state.json").read_text())["data"]["seed"] == winner
    steps = [r["step"] for r in read_metrics(out / METRICS_FILE)]
    assert steps == sorted(set(steps))  # one run's log, not two interleaved


BUILD_CACHE = """
    import sys, time
    from pathlib import Path
    import bilinear_lens.data.corpus as corpus
    real_build, real_train = corpus.build_token_cache, corpus.train_tokenizer
    def build(*args, **kwargs):
        print("built cache", flush=True)
        return real_build(*args, **kwargs)
    def train_tok(*args, **kwargs):
        print("trained tokenizer", flush=True)
        return real_train(*args, **kwargs)
    corpus.build_token_cache, corpus.train_tokenizer = build, train_tok
    while not Path(sys.argv[2]).exists():  # start both processes' work at the same instant
        time.sleep(0.01)
    tok, train, val = corpus.prepare_data("synthetic", vocab_size=300, n_ctx=16, cache_dir=sys.argv[1],
                                          max_docs=800, val_fraction=0.1, tokenizer_train_docs=800)
    print("tokens", int(train.tokens.astype("int64").sum()), len(train.tokens), flush=True)
"""


@pytest.mark.slow  # ~30 s on 2 busy cores: two processes import the package, then serialize
def test_two_processes_filling_one_token_cache_write_it_once(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    procs = [python_process(BUILD_CACHE, str(cache), str(go)) for _ in range(2)]
    time.sleep(1.0)  # both are past their imports and polling
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    printed = "".join(out for out, _ in outputs)
    assert printed.count("trained tokenizer") == 1 and printed.count("built cache") == 1
    token_lines = [line for line in printed.splitlines() if line.startswith("tokens")]
    assert len(token_lines) == 2 and token_lines[0] == token_lines[1]
    assert not [p.name for p in cache.iterdir() if ".tmp-" in p.name or p.suffix == ".lock"]


# --- issue 14.2: the divergence guard names a checkpoint that resumes ------------------------------


def weights_are_sane(checkpoint: Path, bound: float = 1e4) -> bool:
    tensors = read_tensors(checkpoint / "model.safetensors")
    return all(torch.isfinite(t).all() and t.abs().max() <= bound for t in tensors.values())


def test_huge_lr_never_writes_or_names_an_exploded_checkpoint(cache_dir, tmp_path):
    """The issue's reproduction (lr 1e6, no warmup, a checkpoint every step): the loss
    stays finite for a few steps while the weights explode; no such checkpoint is written."""
    cfg = run_config(cache_dir, steps=10, lr=1e6, min_lr=0.0, warmup_steps=0, checkpoint_every=1, eval_every=0)
    with pytest.raises(NonFiniteLossError, match=r"exploding weights: max \|w\| > train.max_abs_weight=10000 "
                       r"\(.*\) at step 1; .*no good checkpoint was written yet"):
        train(cfg, tmp_path, progress=False)
    assert list_checkpoints(tmp_path) == []


def test_following_the_guards_advice_resumes_training(cache_dir, tmp_path):
    sane = run_config(cache_dir, steps=10, checkpoint_every=1, eval_every=0)
    train(sane, tmp_path, progress=False, stop_at=3)
    huge = run_config(cache_dir, steps=10, lr=1e6, min_lr=0.0, warmup_steps=0, checkpoint_every=1, eval_every=0)
    with pytest.raises(NonFiniteLossError) as err:
        train(huge, tmp_path, resume=True, progress=False)
    good = err.value.last_checkpoint
    assert good == tmp_path / CHECKPOINTS_DIR / "step_000003" and f"the last good checkpoint is {good}" in str(err.value)
    assert all(weights_are_sane(path) for _, path in list_checkpoints(tmp_path))
    # The advice: resume from it with a lower lr. Training continues to the end.
    result = train(sane, tmp_path, resume=good, progress=False)
    assert result.finished and result.steps == 10 and weights_are_sane(result.final_checkpoint)
    assert all(r["train_loss"] is None or r["train_loss"] < 10 for r in result.metrics)


def test_guard_checks_weights_and_optimizer_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    guard = DivergenceGuard(max_abs_weight=10.0, last_good=Path("ckpt"))
    guard.check_state(1, model, optimizer)  # healthy: no error
    optimizer.state[model.bias]["exp_avg_sq"][0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"non-finite optimizer state exp_avg_sq of parameter 1 \(inf\) "
                       r"at step 2; .* the last good checkpoint is ckpt"):
        guard.check_state(2, model, optimizer)
    optimizer.state[model.bias]["exp_avg_sq"][0] = 0.0
    with torch.no_grad():
        model.weight[0, 0] = 11.0
    with pytest.raises(NonFiniteLossError, match=r"max \|w\| > train.max_abs_weight=10 \(11.0\) at step 3"):
        guard.check_state(3, model, optimizer)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"non-finite weights in weight \(nan\) at step 4"):
        guard.check_state(4, model, optimizer)
    with torch.no_grad():
        model.weight[0, 0] = 1e30
    DivergenceGuard(max_abs_weight=0.0).check_state(5, model, optimizer)  # 0: no bound on |w|


# --- issue 14.5: metrics.jsonl across kills and resumes ---------------------------------------------


def test_first_record_after_resume_averages_the_same_steps(cache_dir, tmp_path):
    """Stopped between two records (log every 3, stop at 4): the resumed run's records,
    train_loss included, equal the uninterrupted run's."""
    cfg = run_config(cache_dir, steps=9, log_every=3, eval_every=0, checkpoint_every=2)
    straight = train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_at=4)
    resumed = train(cfg, tmp_path / "resumed", resume=True, progress=False)
    keys = ("step", "train_loss", "val_loss", "lr", "tokens")
    assert [[r[k] for k in keys] for r in resumed.metrics] == [[r[k] for k in keys] for r in straight.metrics]
    assert [r["step"] for r in straight.metrics] == [3, 6, 9]


def test_torn_last_metrics_line_is_dropped_with_a_warning(cache_dir, tmp_path, caplog):
    cfg = run_config(cache_dir, steps=8, checkpoint_every=4, eval_every=0)
    straight = train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "run", progress=False, stop_at=4)
    metrics = tmp_path / "run" / METRICS_FILE
    with open(metrics, "a") as fh:
        fh.write('{"step": 6, "train_lo')  # a kill in the middle of a write
    with caplog.at_level(logging.WARNING):
        resumed = train(cfg, tmp_path / "run", resume=True, progress=False)
    assert f"{metrics}: dropped its torn last line 3" in caplog.text
    assert [r["train_loss"] for r in resumed.metrics] == [r["train_loss"] for r in straight.metrics]
    assert read_metrics(metrics) == resumed.metrics

    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{metrics}: line 2 is not a metrics record"):
        read_metrics(metrics)


def test_metrics_rewrite_on_resume_is_atomic(cache_dir, tmp_path, monkeypatch):
    """A crash while the resume rewrites metrics.jsonl leaves the old file whole."""
    import bilinear_lens.training.metrics as metrics_module

    cfg = run_config(cache_dir, steps=8, checkpoint_every=4, eval_every=0)
    train(cfg, tmp_path, progress=False, stop_at=4)
    before = (tmp_path / METRICS_FILE).read_text()
    real_dumps = json.dumps

    def dumps_then_crash(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise KeyboardInterrupt  # a kill after the rewrite's first line (step 2)
        return real_dumps(obj, *args, **kwargs)

    monkeypatch.setattr(metrics_module.json, "dumps", dumps_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path, resume=True, progress=False)
    assert (tmp_path / METRICS_FILE).read_text() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# --- issue 14.6: leftovers of killed writers, permissions ------------------------------------------------


def test_leftovers_of_dead_writers_are_removed_at_start(cache_dir, tmp_path):
    out, pid = tmp_path / "run", dead_pid()
    checkpoints = out / CHECKPOINTS_DIR
    dead = [checkpoints / f".step_000004.tmp-{pid}-x1y2", checkpoints / f".step_000002.old-{pid}",
            out / f".final.tmp-{pid}-abc", out / f".metrics.jsonl.tmp-{pid}"]
    live = [checkpoints / f".step_000004.tmp-{os.getpid()}-keep"]  # a live process's work in progress
    for path in dead[:3] + live:
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "model.safetensors").write_bytes(b"partial")
    dead[3].write_text('{"step"')
    cache_tmp = cache_dir / f"0123abcd.train.bin.tmp-{pid}"
    cache_tmp.write_bytes(b"\0" * 64)
    train(run_config(cache_dir, steps=2, eval_every=0), out, progress=False)
    assert not any(p.exists() for p in dead) and not cache_tmp.exists()
    assert all(p.exists() for p in live)


def test_checkpoints_and_report_follow_the_umask(cache_dir, tmp_path, small_tokenizer):
    """Under umask 027 (not the usual 022, so a hard-coded mode would show)."""
    from bilinear_lens.views.report import write_report

    umask = 0o027
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        train(run_config(cache_dir, steps=2, checkpoint_every=1, eval_every=0), out, progress=False)
        tok = small_tokenizer
        model = build_model(tiny_config(d_vocab=len(tok), n_layers=1), tokenizer=tok)
        report = write_report(model, tmp_path / "report.html", texts=["Lily was happy."], n_eigenvectors=1,
                              ablation_top=2)
        saved = model.save_pretrained(tmp_path / "model")
        text_file = atomic_write_text(tmp_path / "t.txt", "x")
    finally:
        os.umask(old)
    for directory in [out / FINAL_DIR, saved] + [p for _, p in list_checkpoints(out)]:
        assert directory.stat().st_mode & 0o777 == 0o777 & ~umask, directory
    for file in (report, out / FINAL_DIR / "model.safetensors", out / METRICS_FILE):
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file
    assert text_file.stat().st_mode & 0o777 == 0o666 & ~umask
