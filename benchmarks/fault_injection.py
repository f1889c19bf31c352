"""Fault injection: random real SIGKILLs of a training run, then resumes; checks every
checkpoint against an uninterrupted run.

1. Reference: train the tiny recipe (shortened) straight through, keeping every checkpoint.
2. Faulty run: start ``bilinear-lens train`` (``--resume`` once a checkpoint exists), wait
   until it has trained past its start, sleep a random time (so kills land anywhere: mid
   step, mid checkpoint write, between the renames), ``kill -9``; ``--kills`` times. Then
   let it finish.
3. After each kill: every checkpoint on disk must load (weights and training state: else
   *corrupt*) and equal the reference's checkpoint of the same step bit for bit (else the
   resume that wrote it was not bitwise); the steps trained but not checkpointed must be at
   most one checkpoint interval (else *lost*). At the end: the final weights, AdamW state
   and metrics records equal the reference's, and no temporaries are left.

    python -m benchmarks.fault_injection --kills 5          # ~5 min on 2 busy CPU cores
    # -> "5 kills, 5 bitwise resumes, 0 corrupt, 0 lost beyond one checkpoint interval"
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from bilinear_lens.files.serialized import CheckpointError, read_tensors
from bilinear_lens.models.model import load_model
from bilinear_lens.training.config import load_run_config
from bilinear_lens.training.loop import train
from bilinear_lens.training.metrics import read_metrics
from bilinear_lens.training.run_dir import FINAL_DIR, METRICS_FILE, list_checkpoints
from bilinear_lens.files.names import TRAIN_STATE_TENSORS_FILE
from bilinear_lens.training.state import read_train_state

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "training" / "configs" / "tiny.toml"
RECORD_KEYS = ("step", "train_loss", "val_loss", "lr", "tokens")


def overrides(steps: int, every: int, cache_dir: Path) -> list[str]:
    """The tiny recipe, shortened: a record every step, a checkpoint every ``every``."""
    return [f"train.steps={steps}", f"train.checkpoint_every={every}", "train.log_every=1",
            f"train.eval_every={every * 4}", "train.eval_batches=2", "train.keep_last=100000",
            "data.max_docs=4000", f'data.cache_dir="{cache_dir}"', "train.device=\"cpu\""]


def checkpoint_files_equal(a: Path, b: Path) -> bool:
    """Same weights and same training-state tensors (AdamW moments, RNG), bit for bit."""
    for name in ("model.safetensors", TRAIN_STATE_TENSORS_FILE):
        x, y = read_tensors(a / name), read_tensors(b / name)
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return read_train_state(a).step == read_train_state(b).step


def inspect_checkpoints(run: Path, reference: Path) -> tuple[int, int]:
    """(corrupt, differing) checkpoints of ``run`` against ``reference``'s of the same step."""
    corrupt = differing = 0
    ref = dict(list_checkpoints(reference))
    for step, path in list_checkpoints(run):
        try:
            load_model(path)
            read_train_state(path)
        except (CheckpointError, FileNotFoundError, ValueError):
            corrupt += 1
            continue
        differing += not checkpoint_files_equal(path, ref[step])
    return corrupt, differing


def last_logged_step(run: Path) -> int:
    records = read_metrics(run / METRICS_FILE)
    return records[-1]["step"] if records else 0


def start_training(run: Path, args_overrides: list[str]) -> subprocess.Popen:
    resume = ["--resume"] if list_checkpoints(run) else []
    sets = [arg for value in args_overrides for arg in ("--set", value)]
    command = [sys.executable, "-m", "bilinear_lens.cli", "train", "--config", str(TINY_RECIPE),
               "--out", str(run), "--no-progress", "--quiet", *resume, *sets]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_once(run: Path, args_overrides: list[str], rng: random.Random, max_delay: float) -> Optional[int]:
    """Start (or resume) the run, SIGKILL it at a random moment after it trains a step;
    returns the last step it logged, or ``None`` if it finished first."""
    start_step = last_logged_step(run)
    proc = start_training(run, args_overrides)
    while proc.poll() is None and last_logged_step(run) <= start_step:
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, max_delay))
    if proc.poll() is not None:
        if proc.returncode != 0:
            raise RuntimeError(f"training failed: {proc.stderr.read().decode()[-2000:]}")
        return None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return last_logged_step(run)


def run_faults(work: Path, kills: int, steps: int, every: int, seed: int, max_delay: float) -> dict[str, int]:
    """Reference run, then ``kills`` SIGKILLs + resumes; returns the counts of the report line."""
    sets = overrides(steps, every, work / "cache")
    reference = train(load_run_config(TINY_RECIPE, sets), work / "reference", progress=False)
    rng = random.Random(seed)
    run = work / "faulty"
    counts = {"kills": 0, "bitwise": 0, "corrupt": 0, "lost": 0}
    while counts["kills"] < kills:
        reached = kill_once(run, sets, rng, max_delay)
        if reached is None:  # finished before the kill landed: not a fault, start over
            raise RuntimeError(f"the run finished before kill {counts['kills'] + 1}; use more --steps")
        counts["kills"] += 1
        corrupt, differing = inspect_checkpoints(run, work / "reference")
        counts["corrupt"] += corrupt
        counts["bitwise"] += corrupt == differing == 0
        saved = list_checkpoints(run)[-1][0] if list_checkpoints(run) else 0
        counts["lost"] += reached - saved > every
        print(f"kill {counts['kills']}: at step {reached}, newest checkpoint {saved}, "
              f"{corrupt} corrupt, {differing} differing", flush=True)
    finish = start_training(run, sets)
    if finish.wait() != 0:
        raise RuntimeError(f"final resume failed: {finish.stderr.read().decode()[-2000:]}")
    final_equal = checkpoint_files_equal(run / FINAL_DIR, reference.final_checkpoint)
    records_equal = [[r[k] for k in RECORD_KEYS] for r in read_metrics(run / METRICS_FILE)] == \
        [[r[k] for k in RECORD_KEYS] for r in reference.metrics]
    leftovers = [p for p in run.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    print(f"final: weights and optimizer bitwise equal: {final_equal}; metrics records equal: {records_equal}; "
          f"leftover temporaries: {len(leftovers)}")
    counts["final_ok"] = int(final_equal and records_equal and not leftovers)
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs to inject")
    parser.add_argument("--steps", type=int, default=400, help="training steps of the shortened tiny recipe")
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--max-delay", type=float, default=3.0, help="max seconds between a start and its kill")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill times")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    logging.getLogger("bilinear_lens").setLevel(logging.ERROR)  # polling reads torn lines mid-write
    if args.kills < 1 or args.steps < 1 or args.checkpoint_every < 1 or args.max_delay < 0:
        parser.error("--kills, --steps and --checkpoint-every must be >= 1 and --max-delay >= 0")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        counts = run_faults(work, args.kills, args.steps, args.checkpoint_every, args.seed, args.max_delay)
    print(f"{counts['kills']} kills, {counts['bitwise']} bitwise resumes, {counts['corrupt']} corrupt, "
          f"{counts['lost']} lost beyond one checkpoint interval")
    ok = counts["final_ok"] and counts["bitwise"] == counts["kills"] and not counts["corrupt"] and not counts["lost"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
