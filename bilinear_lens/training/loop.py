"""Train a :class:`~bilinear_lens.models.model.BilinearTransformer` from a recipe.

One function, :func:`train`, readable top to bottom (in the spirit of nanoGPT's
``train.py``)::

    setup      distributed env (torchrun), device, data (tokenize once, cached), model,
               AdamW; or all of it restored from a checkpoint (``resume``)
    loop       for each step: lr from the schedule -> batch of the step -> micro-batches
               (forward, backward) -> all-reduced loss, non-finite check -> grad clip ->
               optimizer step -> log / eval / checkpoint
    finish     final eval, final checkpoint (``<out>/final``), :class:`TrainResult`

Run directory (``out_dir``)::

    run_config.toml                 resolved recipe of the latest invocation
    metrics.jsonl                   one JSON object per logged step (see ``_record``)
    checkpoints/step_000100/        model (config.json, model.safetensors, tokenizer.json),
                                    train_state.safetensors + train_state.json, run_config.toml
    final/                          the same, for the last step: load it with
                                    ``BilinearTransformer.from_pretrained(out_dir / "final")``

Exact resume: the batch of a step is a pure function of the step
(:meth:`~bilinear_lens.data.corpus.TokenBlocks.batch`), the learning rate too
(:func:`learning_rate`), the model has no dropout, and a checkpoint holds the weights,
the AdamW moments and the RNG states. So training ``k`` steps, stopping and resuming to
``N`` gives bitwise the weights of training ``N`` steps straight (on the same device and
world size).

Multi-process: launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
Each rank takes its disjoint share of every global batch, DistributedDataParallel
averages the gradients (so the update equals single-process training on the same global
batch, up to float summation order), and only rank 0 writes files or shows progress.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from bilinear_lens.models.checkpoint import atomic_directory, write_model_dir
from bilinear_lens.models.model import load_config, load_model
from bilinear_lens.training.state import (
    TrainState,
    capture_rng_state,
    read_train_state,
    restore_rng_state,
    write_train_state,
)
from bilinear_lens.training.config import RunConfig, TrainConfig
from bilinear_lens.data.corpus import TokenBlocks, prepare_data
from bilinear_lens.models.model import BilinearTransformer
from bilinear_lens.data.tokenizer import to_hf_tokenizer

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "train",
    "learning_rate",
    "make_optimizer",
    "compute_loss",
    "evaluate",
    "unigram_entropy",
    "list_checkpoints",
    "latest_checkpoint",
    "iter_metrics",
    "CHECKPOINTS_DIR",
    "FINAL_DIR",
    "METRICS_FILE",
    "RUN_CONFIG_FILE",
]

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "run_config.toml"
_STEP_PREFIX = "step_"


class NonFiniteLossError(RuntimeError):
    """The training loss (or gradient norm) became NaN/inf. The update of that step was not
    applied and no checkpoint was written after it: ``last_checkpoint`` is intact."""

    def __init__(self, step: int, what: str, value: float, last_checkpoint: Optional[Path]):
        self.step, self.value, self.last_checkpoint = step, value, last_checkpoint
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"non-finite {what} ({value}) at step {step}; training stopped before applying that update, "
            f"{where} (resume from it with a lower train.lr or a smaller train.grad_clip)"
        )


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``final_checkpoint``: ``out_dir/final`` (or the step checkpoint where ``stop_at``
    stopped the run). ``val_loss``: validation loss at the last step (nats/token; ``None``
    without a validation split). ``unigram_entropy``: entropy of the validation (else
    training) token distribution, the loss of the best context-free predictor, for
    comparison. ``metrics``: every record of ``metrics.jsonl``, resumed runs included.
    """

    final_checkpoint: Path
    val_loss: Optional[float]
    steps: int
    metrics: list[dict[str, Any]]
    out_dir: Path
    unigram_entropy: float
    finished: bool = True  # False when stop_at ended the run before the schedule did


# --- distributed setup ------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    created_group: bool = False  # whether train() must destroy the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer") from None


def _setup_distributed(device: torch.device) -> _Dist:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; join the process group when > 1 process."""
    world_size = _env_int("WORLD_SIZE", 1)
    d = _Dist(rank=_env_int("RANK", 0), local_rank=_env_int("LOCAL_RANK", 0), world_size=world_size)
    if d.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        d.created_group = True
    return d


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r} but CUDA is not available; use 'auto' or 'cpu'")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    return torch.device(name)


def _barrier(d: _Dist) -> None:
    if d.enabled:
        dist.barrier()


# --- schedule, optimizer, loss ------------------------------------------------------------


def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for the update that takes ``step`` completed steps to ``step + 1``.

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over the first ``warmup_steps``
    updates, then ``cfg.schedule`` from ``lr`` (right after warmup) to ``min_lr`` (last
    update): ``cosine`` (half cosine), ``linear``, or ``constant`` (stays at ``lr``).
    A pure function of the step, so the schedule's state is just the step.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = total_steps - cfg.warmup_steps - 1
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        factor = 1.0 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of dimension >= 2 (matmul weights, embedding,
    unembedding) and none on 1-D ones (norm scales, biases): nanoGPT's split, which keeps
    decay from shrinking the scale-like parameters that have no redundancy to spare."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def compute_loss(model: torch.nn.Module, block: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy of blocks ``[batch, n_ctx + 1]``: inputs ``block[:, :-1]``,
    targets ``block[:, 1:]`` (float32 log-softmax whatever the model dtype)."""
    logits = model(block[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), block[:, 1:].flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    blocks: TokenBlocks,
    batch_size: int,
    max_batches: int = 0,
    device: Union[str, torch.device] = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean next-token loss over ``blocks`` (all of them, or the first ``max_batches``
    batches), each rank taking every ``world_size``-th batch; the per-rank sums are
    all-reduced, so every rank returns the same value."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of losses, n tokens]
    for i, block in enumerate(blocks.eval_batches(batch_size, rank, world_size)):
        if max_batches and rank + i * world_size >= max_batches:
            break
        block = block.to(device)
        total[0] += compute_loss(model, block, reduction="sum").double()
        total[1] += block[:, 1:].numel()
    if world_size > 1:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the token frequency distribution of ``tokens``: the loss of the
    best predictor that ignores context, a yardstick for the validation loss."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --- checkpoints ----------------------------------------------------------------------------


def _step_dir_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:06d}"


def list_checkpoints(out_dir: Union[str, Path]) -> list[tuple[int, Path]]:
    """Complete step checkpoints of a run, oldest first, as ``(step, path)``."""
    root = Path(out_dir) / CHECKPOINTS_DIR
    found = []
    if root.is_dir():
        for child in root.iterdir():
            suffix = child.name[len(_STEP_PREFIX):]
            if child.name.startswith(_STEP_PREFIX) and suffix.isdigit() and (child / "train_state.json").is_file():
                found.append((int(suffix), child))
    return sorted(found)


def latest_checkpoint(out_dir: Union[str, Path]) -> Optional[Path]:
    """The newest step checkpoint of a run, or ``None``."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def _save_checkpoint(path: Path, model: BilinearTransformer, run_config: RunConfig, state: TrainState) -> None:
    """Write a complete checkpoint atomically (temp dir + rename): model files, training
    state, resolved recipe. A crash mid-write leaves the previous checkpoint untouched."""
    with atomic_directory(path) as tmp:
        write_model_dir(tmp, model.cfg.to_dict(), model.state_dict(), model.tokenizer)
        write_train_state(tmp, state)
        run_config.save_toml(tmp / RUN_CONFIG_FILE)


def _prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _resolve_resume(resume: Union[bool, str, Path], out_dir: Path) -> Optional[Path]:
    if resume is False or resume is None:
        existing = latest_checkpoint(out_dir)
        if existing is not None:
            raise FileExistsError(
                f"{out_dir} already holds checkpoints (latest {existing.name}); pass resume=True "
                "(CLI: --resume) to continue that run, or choose another output directory"
            )
        return None
    if resume is True:
        path = latest_checkpoint(out_dir)
        if path is None:
            raise FileNotFoundError(f"resume requested but {out_dir / CHECKPOINTS_DIR} holds no complete checkpoint")
        return path
    path = Path(resume)
    if not (path / "train_state.json").is_file():
        raise FileNotFoundError(f"cannot resume from {path}: no train_state.json there (not a training checkpoint)")
    return path


# --- metrics --------------------------------------------------------------------------------


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Records of an earlier invocation, dropping any logged after the resumed checkpoint."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]


def _record(
    step: int, train_loss: Optional[float], val_loss: Optional[float], lr: float,
    tokens_per_s: Optional[float], tokens: int, elapsed_s: float,
) -> dict[str, Any]:
    """One metrics line: ``step`` (updates done), ``train_loss`` (mean over the steps since
    the last record), ``val_loss`` (when evaluated at this step, else null), ``lr`` (of the
    last update), ``tokens_per_s`` (training throughput over the interval, all ranks),
    ``tokens`` (seen so far), ``elapsed_s`` (wall time since the run first started)."""
    return {"step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr,
            "tokens_per_s": tokens_per_s, "tokens": tokens, "elapsed_s": round(elapsed_s, 3)}


# --- the training function ------------------------------------------------------------------


def train(
    run_config: RunConfig,
    out_dir: Union[str, Path],
    resume: Union[bool, str, Path] = False,
    progress: bool = True,
    stop_at: Optional[int] = None,
) -> TrainResult:
    """Train a model from ``run_config`` into ``out_dir`` (see the module docstring).

    Args:
        run_config: the recipe (:func:`bilinear_lens.training.config.load_run_config`).
        out_dir: run directory; created if missing.
        resume: ``False``: start fresh (refused if ``out_dir`` already has checkpoints);
            ``True``: continue from the newest checkpoint in ``out_dir``; a path: continue
            from that checkpoint. The model config must match the checkpoint's; the
            ``[train]`` section may change (e.g. more steps).
        progress: show a tqdm bar on rank 0 (also off when stderr is not a terminal).
        stop_at: stop after this many steps with a checkpoint, as if preempted, instead of
            finishing the schedule (the schedule still spans all ``train.steps``).

    Raises:
        ValueError: bad config or data (before any training step); ``FileNotFoundError``
            for a missing corpus or checkpoint; :class:`NonFiniteLossError` when the loss
            diverges.
    """
    out_dir = Path(out_dir)
    tc = run_config.train
    probe = _Dist(rank=_env_int("RANK", 0), local_rank=_env_int("LOCAL_RANK", 0), world_size=_env_int("WORLD_SIZE", 1))
    device = _resolve_device(tc.device, probe.local_rank)
    if tc.batch_size % (probe.world_size * tc.grad_accum):
        raise ValueError(
            f"train.batch_size={tc.batch_size} in {run_config.source} must be divisible by "
            f"world_size * train.grad_accum = {probe.world_size} * {tc.grad_accum}"
        )
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"stop_at must be >= 1, got {stop_at}")
    ckpt_path = _resolve_resume(resume, out_dir)
    ddp = _setup_distributed(device)
    threads_before = torch.get_num_threads()
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    try:
        return _train(run_config, out_dir, ckpt_path, progress, stop_at, ddp, device)
    finally:
        torch.set_num_threads(threads_before)
        if ddp.created_group:
            dist.destroy_process_group()


def _train(
    run_config: RunConfig,
    out_dir: Path,
    ckpt_path: Optional[Path],
    progress: bool,
    stop_at: Optional[int],
    ddp: _Dist,
    device: torch.device,
) -> TrainResult:
    tc, dc = run_config.train, run_config.data

    # ---- data: rank 0 tokenizes (and fills the cache) first, the others then read it ----
    tokenizer_arg: Any = dc.tokenizer or None
    if ckpt_path is not None:  # continue with exactly the checkpoint's tokenizer
        tokenizer_arg = ckpt_path / "tokenizer.json"
    if not ddp.is_main:
        _barrier(ddp)
    tokenizer, train_blocks, val_blocks = prepare_data(
        dc.source, tokenizer=tokenizer_arg, vocab_size=dc.vocab_size, n_ctx=run_config.model.n_ctx,
        cache_dir=dc.cache_dir, val_fraction=dc.val_fraction, seed=dc.seed, max_docs=dc.max_docs or None,
        split=dc.split, max_chars=dc.max_chars or None, text_column=dc.text_column, streaming=dc.streaming,
        tokenizer_train_docs=dc.tokenizer_train_docs or None, progress=progress and ddp.is_main,
    )
    if ddp.is_main:
        _barrier(ddp)
    run_config = run_config.with_vocab_size(tokenizer.get_vocab_size())
    batches_per_epoch = train_blocks.batches_per_epoch(tc.batch_size)  # raises if batch > data
    total_steps = tc.steps or math.ceil(tc.epochs * batches_per_epoch)
    micro_batch = tc.batch_size // (ddp.world_size * tc.grad_accum)
    tokens_per_step = tc.batch_size * run_config.model.n_ctx

    # ---- model and optimizer: fresh, or restored from a checkpoint ----
    state: Optional[TrainState] = None
    if ckpt_path is not None:
        saved_cfg = load_config(ckpt_path)
        if saved_cfg != run_config.model:
            diffs = {k: (v, getattr(run_config.model, k)) for k, v in saved_cfg.to_dict().items()
                     if getattr(run_config.model, k) != v}
            raise ValueError(
                f"cannot resume from {ckpt_path}: its model config differs from {run_config.source} "
                f"in {{field: (checkpoint, recipe)}} = {diffs}"
            )
        model = load_model(ckpt_path, device=device)
        state = read_train_state(ckpt_path)
    else:
        model = BilinearTransformer(run_config.model).to(device)
    model.tokenizer = to_hf_tokenizer(tokenizer, model_max_length=run_config.model.n_ctx)
    model.train()
    optimizer = make_optimizer(model, tc)
    start_step, elapsed_before, tokens_seen = 0, 0.0, 0
    # Nothing in the loop draws random numbers today (no dropout; the data order has its own
    # seeded generator), but seed the global generators so any future stochastic op is
    # reproducible too; a resumed run restores their saved states instead.
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    if state is not None:
        optimizer.load_state_dict(state.optimizer)
        for group, decay in zip(optimizer.param_groups, (tc.weight_decay, 0.0)):  # the recipe may change these
            group.update(betas=(tc.beta1, tc.beta2), eps=tc.eps, weight_decay=decay)
        if state.rng is not None:
            restore_rng_state(state.rng)
        start_step = state.step
        elapsed_before = float(state.metrics.get("elapsed_s", 0.0))
        tokens_seen = int(state.metrics.get("tokens", start_step * tokens_per_step))
    # DDP averages gradients over ranks during backward (bucketed all-reduce).
    train_model: torch.nn.Module = model
    if ddp.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if tc.autocast == "bfloat16" else contextlib.nullcontext()
    )

    # ---- run directory, metrics ----
    metrics_path = out_dir / METRICS_FILE
    records = _read_metrics(metrics_path, start_step) if ckpt_path is not None else []
    if ddp.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        run_config.save_toml(out_dir / RUN_CONFIG_FILE)
        with open(metrics_path, "w") as fh:  # rewrite: drops records past a resumed checkpoint
            fh.writelines(json.dumps(r) + "\n" for r in records)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(
            "training %s params (%s MLP) on %s x %d process(es): %d steps of %d tokens, %d steps/epoch%s",
            f"{n_params:,}", run_config.model.mlp_kind, device, ddp.world_size, total_steps, tokens_per_step,
            batches_per_epoch, f", resuming at step {start_step}" if start_step else "",
        )
    last_checkpoint = ckpt_path
    last_val: Optional[float] = None
    val_batch = tc.eval_batch_size or micro_batch
    start_time = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start_time

    def run_eval() -> Optional[float]:
        if val_blocks is None:
            return None
        return evaluate(model, val_blocks, val_batch, tc.eval_batches, device, ddp.rank, ddp.world_size)

    def log(record: dict[str, Any]) -> None:
        records.append(record)
        if ddp.is_main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def save(step: int, path: Path) -> None:
        nonlocal last_checkpoint
        if ddp.is_main:
            metrics = {"elapsed_s": elapsed(), "tokens": tokens_seen, "val_loss": last_val,
                       "train_loss": records[-1]["train_loss"] if records else None}
            state = TrainState(
                step=step, optimizer=optimizer.state_dict(), metrics=metrics, rng=capture_rng_state(),
                scheduler={"schedule": tc.schedule, "next_lr": learning_rate(step, tc, total_steps),
                           "total_steps": total_steps},
                data={"next_step": step, "epoch": step // batches_per_epoch, "batch_size": tc.batch_size,
                      "seed": tc.seed, "world_size": ddp.world_size},
            )
            _save_checkpoint(path, model, run_config, state)
        _barrier(ddp)
        last_checkpoint = path

    if start_step == 0 and tc.eval_every:  # the untrained loss, ~ln(d_vocab): a baseline
        last_val = run_eval()
        log(_record(0, None, last_val, learning_rate(0, tc, total_steps), None, 0, elapsed()))

    # ---- the loop ----
    end_step = total_steps if stop_at is None else min(stop_at, total_steps)
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=True if not (progress and ddp.is_main) else None)
    interval_loss, interval_steps, interval_time = 0.0, 0, 0.0
    lr = learning_rate(start_step, tc, total_steps)
    step = start_step
    optimizer.zero_grad(set_to_none=True)
    while step < end_step:
        t0 = time.perf_counter()
        lr = learning_rate(step, tc, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # This rank's share of the global batch of this step, split into micro-batches.
        batch = train_blocks.batch(step, tc.batch_size, ddp.rank, ddp.world_size, seed=tc.seed).to(device)
        loss_sum = torch.zeros((), device=device)
        for i, micro in enumerate(batch.split(micro_batch)):
            last_micro = i == tc.grad_accum - 1
            # Skip DDP's gradient all-reduce until the last micro-batch of the step.
            sync = contextlib.nullcontext() if (last_micro or not ddp.enabled) else train_model.no_sync()
            with sync:
                with autocast:
                    loss = compute_loss(train_model, micro) / tc.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if ddp.enabled:  # the global mean loss, for logging and a rank-consistent NaN check
            dist.all_reduce(loss_sum)
            loss_sum /= ddp.world_size
        train_loss = float(loss_sum)
        if not math.isfinite(train_loss):
            bar.close()
            raise NonFiniteLossError(step + 1, "training loss", train_loss, last_checkpoint)
        if tc.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
            if not math.isfinite(grad_norm):
                bar.close()
                raise NonFiniteLossError(step + 1, "gradient norm", grad_norm, last_checkpoint)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += tokens_per_step
        interval_loss += train_loss
        interval_steps += 1
        interval_time += time.perf_counter() - t0

        # ---- bookkeeping: log, eval, checkpoint ----
        is_last = step == end_step
        do_eval = bool(tc.eval_every and step % tc.eval_every == 0) or (step == total_steps)
        do_log = bool(tc.log_every and step % tc.log_every == 0) or do_eval or is_last
        if do_eval:
            last_val = run_eval()
        if do_log:
            tokens_per_s = interval_steps * tokens_per_step / interval_time if interval_time > 0 else None
            log(_record(step, interval_loss / interval_steps, last_val if do_eval else None, lr,
                        tokens_per_s, tokens_seen, elapsed()))
            bar.set_postfix(loss=f"{interval_loss / interval_steps:.3f}",
                            tok_s=f"{tokens_per_s:,.0f}" if tokens_per_s else "-")
            interval_loss, interval_steps, interval_time = 0.0, 0, 0.0
        if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or is_last:
            save(step, out_dir / CHECKPOINTS_DIR / _step_dir_name(step))
            if ddp.is_main:
                _prune_checkpoints(out_dir, tc.keep_last)
        bar.update(1)
    bar.close()

    # ---- finish: the final model, or the checkpoint where stop_at stopped us ----
    finished = step >= total_steps
    if step == start_step and ckpt_path is not None:  # nothing left to train
        last_val = run_eval()
    final = last_checkpoint
    if finished:
        final = out_dir / FINAL_DIR
        save(step, final)
    assert final is not None
    entropy_tokens = val_blocks.tokens if val_blocks is not None else train_blocks.tokens
    if ddp.is_main:
        logger.info("step %d: val loss %s; checkpoint %s", step, last_val, final)
    return TrainResult(
        final_checkpoint=final, val_loss=last_val, steps=step, metrics=records, out_dir=out_dir,
        unigram_entropy=unigram_entropy(entropy_tokens), finished=finished,
    )


def iter_metrics(out_dir: Union[str, Path]) -> Iterator[dict[str, Any]]:
    """The records of ``out_dir/metrics.jsonl``, in order."""
    with open(Path(out_dir) / METRICS_FILE) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
