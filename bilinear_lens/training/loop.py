"""Train a :class:`~bilinear_lens.models.model.BilinearTransformer` from a recipe.

Two layers, each readable top to bottom (in the spirit of nanoGPT's ``train.py`` and
SAELens' ``SAETrainer.fit()``):

- :func:`train` (the language model): read the environment once, lock the run directory,
  prepare the data (tokenize once, cached), build or restore the model, wrap them in a
  :class:`TrainTask`, run a :class:`Trainer`, return a :class:`TrainResult`.
- :class:`Trainer` (any model, any loss): ``fit()`` is the loop ::

      while step < end_step:
          step()                      lr from the schedule -> batch -> micro-batches
                                      (forward, backward) -> all-reduced loss, NaN guard ->
                                      grad clip -> optimizer step -> task.after_step
          _evaluate_if_needed()
          _log_if_needed()            metrics.jsonl, progress bar
          _checkpoint_if_needed()     divergence guard, then an atomic checkpoint

Extension point: another model and loss (e.g. a top-k SAE on cached activations) reuse
the whole machinery (schedule, gradient accumulation, DDP, NaN/explosion guard,
checkpoints with exact resume, metrics, progress) by building a :class:`TrainTask`
(its model, ``batch(step)``, ``loss(model, micro_batch)``, ``evaluate()``,
``write_model_files(dir)``, ``data_state(step)``; optionally ``after_step(step)`` for a
constraint applied after every update, ``load_data_state(data)`` for task state that a
checkpoint carries, ``record_fields(evaluated)`` for task metrics in each record) and
calling ``Trainer(task, optimizer, ...).fit(end_step)`` inside :func:`claim_run_dir`;
:func:`~bilinear_lens.training.state.load_trainer_state` restores its optimizer on resume
once the caller has loaded the weights. Exact resume needs ``batch(step)`` to be a pure
function of the step (as :meth:`~bilinear_lens.data.corpus.TokenBlocks.batch` is).
:func:`bilinear_lens.sae.train.train_sae` is such a task.

Run directory layout: :mod:`bilinear_lens.training.run_dir`. Its top-level
``run_config.toml`` always describes the run's newest checkpoint: it is written right
after each checkpoint (``TrainTask.after_checkpoint``), never before, so a resume with a
changed recipe (``--set train.lr=...``) that fails before its first checkpoint leaves
the file as it was, and a plain ``--resume`` continues with the recipe of the checkpoint
it resumes (each checkpoint also holds its own copy). Nothing in the run directory is
changed before the resumed checkpoint's training state is read and checked (a bad
``train_state.json`` is refused naming the file, with ``metrics.jsonl`` untouched).

Exact resume: the batch and the learning rate of a step are pure functions of the step,
the model has no dropout, and a checkpoint holds the weights, the AdamW moments, the RNG
states and the running metrics interval. So training ``k`` steps, stopping and resuming to ``N`` gives bitwise the
weights and metrics of training ``N`` steps straight (on the same device and world size).

Multi-process: launch with ``torchrun``. Each rank takes its disjoint share of every
global batch, DistributedDataParallel averages the gradients (so the update equals
single-process training on the same global batch, up to float summation order), and only
rank 0 writes files or shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from bilinear_lens.progress import progress_bar
from bilinear_lens.data.corpus import TokenBlocks, corpus_fingerprint, is_local_source, prepare_data, resolved_source
from bilinear_lens.data.fingerprint import (
    DATA_FINGERPRINT_FILE,
    FileFingerprint,
    holds_recorded_bytes,
    find_difference,
    read_fingerprint,
    write_fingerprint,
)
from bilinear_lens.data.split_summary import documents_line
from bilinear_lens.data.tokenizer import to_hf_tokenizer
from bilinear_lens.files.atomic import atomic_write_text
from bilinear_lens.files.names import TOKENIZER_FILE
from bilinear_lens.models.checkpoint import write_model_dir
from bilinear_lens.models.loading import load_config
from bilinear_lens.models.model import BilinearTransformer, load_model
from bilinear_lens.training.config import RunConfig, TrainConfig, load_run_config
from bilinear_lens.distributed import DistEnv, read_environment
from bilinear_lens.training.guard import DivergenceGuard, NonFiniteLossError
from bilinear_lens.training.metrics import IntervalMeter, MetricsLog, make_record, read_metrics
from bilinear_lens.training.resume_rule import (
    check_steps_reach, finished_final, format_differences, refused_differences,
)
from bilinear_lens.training.run_dir import (
    CHECKPOINTS_DIR,
    FINAL_DIR,
    METRICS_FILE,
    RUN_CONFIG_FILE,
    check_stop_at,
    checkpoint_path,
    claim_run_dir,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume,
)
from bilinear_lens.training.state import (
    TrainState,
    load_trainer_state,
    read_train_state,
    save_trainer_state,
    seed_everything,
)

__all__ = [
    "NonFiniteLossError",
    "TrainResult",
    "TrainTask",
    "Trainer",
    "train",
    "learning_rate",
    "make_optimizer",
    "apply_recipe_hyperparameters",
    "compute_loss",
    "evaluate",
    "unigram_entropy",
    "list_checkpoints",
    "latest_checkpoint",
    "CHECKPOINTS_DIR",
    "FINAL_DIR",
    "METRICS_FILE",
    "RUN_CONFIG_FILE",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``final_checkpoint``: ``out_dir/final`` (or the step checkpoint where ``stop_at``
    stopped the run). ``val_loss``: the last validation loss (nats/token; ``None`` without a
    validation split), evaluated at step ``val_step`` (the last step, or for a ``stop_at``
    between evaluations the evaluation before it; ``None`` where a checkpoint written before
    steps were recorded does not say). ``unigram_entropy``: entropy of the validation (else
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
    already_finished: bool = False  # resumed a finished run: nothing trained, evaluated or written
    val_step: Optional[int] = None  # the step val_loss was evaluated at (a --stop-at between evaluations: earlier)


# --- schedule, optimizer, loss ------------------------------------------------------------


def learning_rate(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Learning rate for the update that takes ``step`` completed steps to ``step + 1``.

    Linear warmup from ``lr / warmup_steps`` to ``lr`` over the first ``warmup_steps``
    updates, then ``cfg.schedule`` from ``lr`` (right after warmup) to ``min_lr`` (last
    update): ``cosine`` (half cosine), ``linear``, or ``constant`` (stays at ``lr``).
    A pure function of the step, so the schedule's state is just the step; defined for
    every validated ``cfg`` and every ``step >= 0`` (a negative step is a ``ValueError``).
    """
    if not step >= 0:  # also refuses NaN
        raise ValueError(f"learning_rate: step must be >= 0, got {step!r}")
    if step < cfg.warmup_steps:  # so warmup_steps >= 1 here
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


def apply_recipe_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Set the recipe's betas, eps and weight decay on restored param groups (a resumed
    run's recipe may change them); the groups are :func:`make_optimizer`'s."""
    for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
        group.update(betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=decay)


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


# --- the generic trainer -------------------------------------------------------------------


@dataclass
class TrainTask:
    """The model-specific half of a training run; :class:`Trainer` does the rest.

    ``model``: the bare module (its parameters are optimized, checked and saved).
    ``batch(step)``: this rank's share of the global batch of ``step`` (a pure function of
    the step for exact resume), split by the trainer into ``grad_accum`` micro-batches.
    ``loss(module, micro_batch)``: mean loss of a micro-batch, a scalar tensor (``module``
    is ``model`` or its DDP wrapper). ``evaluate()``: validation loss, the same on every
    rank, or ``None``. ``write_model_files(directory)``: the model's files of a checkpoint.
    ``data_state(step)``: the data position (and any other task state, e.g. running
    counters) saved in a checkpoint (JSON-able). ``tokens_per_step``: items a step
    consumes over all ranks (throughput, ``tokens``).

    Optional: ``after_step(step)``: called after each optimizer step with the steps now
    completed (e.g. to project weights back onto a constraint set), before the step is
    logged or checkpointed. ``load_data_state(data)``: on resume, receives the checkpoint's
    ``data_state`` (restore the task state it carries). ``record_fields(evaluated)``: extra
    fields for the metrics record of the current step (``evaluated``: ``evaluate()`` ran
    at this step). ``baseline_eval``: evaluate and log the untrained model at step 0.
    ``after_checkpoint(path)``: called on rank 0 once a checkpoint is complete at ``path``
    (e.g. to record the recipe it was made with next to the run's checkpoints).
    """

    model: torch.nn.Module
    batch: Callable[[int], Tensor]
    loss: Callable[[torch.nn.Module, Tensor], Tensor]
    evaluate: Callable[[], Optional[float]]
    write_model_files: Callable[[Path], None]
    data_state: Callable[[int], dict[str, Any]]
    tokens_per_step: int
    after_step: Callable[[int], None] = lambda step: None
    load_data_state: Callable[[dict[str, Any]], None] = lambda data: None
    record_fields: Callable[[bool], dict[str, Any]] = lambda evaluated: {}
    baseline_eval: bool = True
    after_checkpoint: Callable[[Path], None] = lambda path: None


class Trainer:
    """Optimizes ``task.model`` for ``total_steps`` steps of ``cfg`` into ``out_dir``.

    ``resume_from``: a checkpoint whose weights ``task.model`` already holds; the trainer
    restores the optimizer, RNGs, step and metrics from it. Call inside
    :func:`~bilinear_lens.training.run_dir.claim_run_dir`.
    """

    def __init__(
        self, task: TrainTask, optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
        env: DistEnv, out_dir: Path, resume_from: Optional[Path] = None, progress: bool = True,
    ):
        self.task, self.optimizer, self.cfg, self.total_steps = task, optimizer, cfg, total_steps
        self.env, self.out_dir, self.resume_from, self.progress = env, out_dir, resume_from, progress
        self.micro_batch = cfg.batch_size // (env.world_size * cfg.grad_accum)
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.meter = IntervalMeter()
        self.last_val: Optional[float] = None
        self.last_val_step: Optional[int] = None  # the step last_val was evaluated at (None: unknown)
        self.end_step = total_steps  # where fit() stops; set again by each fit()
        # Nothing in the loop draws random numbers today (no dropout; the data order has its
        # own seeded generator), but seed the global generators so any future stochastic op
        # is reproducible too; load_trainer_state restores their saved states instead.
        seed_everything(cfg.seed)
        if resume_from is not None:
            self._restore(load_trainer_state(resume_from, optimizer))
        self.lr = learning_rate(self.step, cfg, total_steps)
        self.guard = DivergenceGuard(cfg.max_abs_weight, last_good=resume_from)
        self.log = MetricsLog(out_dir / METRICS_FILE, write=env.is_main,
                              resume_step=self.step if resume_from is not None else None)
        self.train_model = task.model  # DDP averages gradients over ranks during backward
        if env.enabled:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(task.model, device_ids=device_ids)
        self.autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if cfg.autocast == "bfloat16"
                         else contextlib.nullcontext())
        self.start_time = time.perf_counter()
        self.bar: Any = None

    def _restore(self, state: TrainState) -> None:
        self.step = state.step
        self.elapsed_before = float(state.metrics.get("elapsed_s", 0.0))
        self.tokens_seen = int(state.metrics.get("tokens", state.step * self.task.tokens_per_step))
        self.meter = IntervalMeter.from_state(state.metrics.get("interval"))
        # The last validation, as an uninterrupted run still holds it (checkpoints and the
        # final report record it until the next evaluation).
        val_loss = state.metrics.get("val_loss")
        if val_loss is not None and (isinstance(val_loss, bool) or not isinstance(val_loss, (int, float))):
            from bilinear_lens.files.serialized import CheckpointError

            raise CheckpointError(f"{self.resume_from}: metrics.val_loss = {val_loss!r} must be a number or null")
        self.last_val = None if val_loss is None else float(val_loss)
        val_step = state.metrics.get("val_step")  # absent in checkpoints written before it was recorded
        self.last_val_step = val_step if isinstance(val_step, int) and not isinstance(val_step, bool) else None
        self.task.load_data_state(state.data)

    @property
    def finished(self) -> bool:
        return self.step >= self.total_steps

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def fit(self, end_step: Optional[int] = None) -> Path:
        """Train to ``end_step`` (default: the end of the schedule) with a checkpoint there;
        at the end of the schedule also write ``out_dir/final``. Returns the last checkpoint."""
        end_step = self.total_steps if end_step is None else min(end_step, self.total_steps)
        self.end_step = end_step
        if self.step == 0 and self.cfg.eval_every and self.task.baseline_eval:  # the untrained loss
            self.last_val, self.last_val_step = self.task.evaluate(), 0
            fields = self.task.record_fields(True)
            self.log.append({**make_record(0, None, self.last_val, self.lr, None, 0, self.elapsed()), **fields})
            self._log_evaluation(fields, untrained=True)
        elif self.step >= end_step and self.resume_from is not None:  # nothing left to train
            self.last_val, self.last_val_step = self.task.evaluate(), self.step
        self.bar = progress_bar(total=self.total_steps, initial=self.step, desc="train", unit="step",
                                enabled=self.progress and self.env.is_main)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            while self.step < end_step:
                self.train_step()
                evaluated = self._evaluate_if_needed()
                self._log_if_needed(evaluated)
                self._checkpoint_if_needed(end_step)
                self.bar.update(1)
        finally:
            self.bar.close()
        if self.finished:
            self.save_checkpoint(self.out_dir / FINAL_DIR)
        assert self.guard.last_good is not None  # end_step >= 1 always checkpoints
        return self.guard.last_good

    def train_step(self) -> None:
        """One optimizer step: schedule, gradients of this rank's batch, guard, clip, update."""
        t0 = time.perf_counter()
        self.lr = learning_rate(self.step, self.cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        loss = self._accumulate_gradients(self.task.batch(self.step))
        self.guard.check_scalar(self.step + 1, "training loss", loss)
        if self.cfg.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.task.model.parameters(), self.cfg.grad_clip))
            self.guard.check_scalar(self.step + 1, "gradient norm", grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.task.after_step(self.step)
        self.tokens_seen += self.task.tokens_per_step
        self.meter.add(loss, time.perf_counter() - t0)

    def _accumulate_gradients(self, batch: Tensor) -> float:
        """Backward over the micro-batches of ``batch``; the global mean loss (all ranks)."""
        loss_sum = torch.zeros((), device=self.env.device)
        for i, micro in enumerate(batch.to(self.env.device).split(self.micro_batch)):
            last_micro = i == self.cfg.grad_accum - 1
            # Skip DDP's gradient all-reduce until the last micro-batch of the step.
            sync = contextlib.nullcontext() if (last_micro or not self.env.enabled) else self.train_model.no_sync()
            with sync:
                with self.autocast:
                    loss = self.task.loss(self.train_model, micro) / self.cfg.grad_accum
                loss.backward()
            loss_sum += loss.detach()
        if self.env.enabled:  # the global mean, for logging and a rank-consistent NaN check
            dist.all_reduce(loss_sum)
            loss_sum /= self.env.world_size
        return float(loss_sum)

    def _evaluate_if_needed(self) -> bool:
        due = bool(self.cfg.eval_every and self.step % self.cfg.eval_every == 0) or self.step == self.total_steps
        if due:
            self.last_val, self.last_val_step = self.task.evaluate(), self.step
            if self.step < self.end_step:  # the caller reports the last step itself (with its checkpoint)
                self._log_evaluation(self.task.record_fields(True))
        return due

    def _log_evaluation(self, fields: dict[str, Any], untrained: bool = False) -> None:
        """One stderr line per evaluation (rank 0), so a run logged off a terminal shows its
        validation curve as it goes, not only at the end (:func:`evaluation_line`)."""
        if not self.env.is_main:
            return
        seconds_per_step = self.meter.seconds / self.meter.steps if self.meter.steps else None
        line = evaluation_line(self.step, self.total_steps, self.last_val, fields,
                               None if untrained else self.meter.mean_loss(), seconds_per_step)
        if self.bar is not None:  # a terminal bar: cleared for the line, redrawn below it
            self.bar.clear()
        logger.info("%s", line)
        if self.bar is not None:
            self.bar.refresh()

    def _log_if_needed(self, evaluated: bool) -> None:
        if not (evaluated or (self.cfg.log_every and self.step % self.cfg.log_every == 0)):
            return
        tokens_per_s = self.meter.items_per_s(self.task.tokens_per_step)
        self.log.append({**make_record(self.step, self.meter.mean_loss(), self.last_val if evaluated else None,
                                       self.lr, tokens_per_s, self.tokens_seen, self.elapsed()),
                         **self.task.record_fields(evaluated)})
        self.bar.set_postfix(loss=f"{self.meter.mean_loss():.3f}", tok_s=f"{tokens_per_s:,.0f}" if tokens_per_s else "-")
        self.meter.reset()

    def _checkpoint_if_needed(self, end_step: int) -> None:
        if (self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0) or self.step == end_step:
            self.save_checkpoint(checkpoint_path(self.out_dir, self.step))
            if self.env.is_main:
                prune_checkpoints(self.out_dir, self.cfg.keep_last)

    def save_checkpoint(self, path: Path) -> None:
        """Check the weights and optimizer state (:class:`DivergenceGuard`), then write a
        checkpoint of the current step at ``path`` (rank 0) and record it as good."""
        self.guard.check_state(self.step, self.task.model, self.optimizer)
        if self.env.is_main:
            metrics = {"elapsed_s": self.elapsed(), "tokens": self.tokens_seen, "val_loss": self.last_val,
                       "val_step": self.last_val_step,
                       "train_loss": self.log.last_train_loss, "interval": self.meter.state()}
            scheduler = {"schedule": self.cfg.schedule, "total_steps": self.total_steps,
                         "next_lr": learning_rate(self.step, self.cfg, self.total_steps)}
            state = TrainState(step=self.step, optimizer={}, scheduler=scheduler,
                               data=self.task.data_state(self.step), metrics=metrics)
            save_trainer_state(path, self.optimizer, state, self.task.write_model_files)
            self.task.after_checkpoint(path)
        self.env.barrier()
        self.guard.mark_good(path)


def evaluation_line(step: int, total_steps: int, val_loss: Optional[float], fields: dict[str, Any],
                    train_loss: Optional[float], seconds_per_step: Optional[float]) -> str:
    """``step 40/300: val loss 3.2141 (train loss 3.3012, 0.21 s/step)``; a task's own
    held-out metrics (``val_*`` fields, e.g. an SAE's ``val_mse``) replace ``val loss``, and
    step 0 reads ``(untrained)``."""
    own = {k: v for k, v in fields.items() if k.startswith("val_") and isinstance(v, (int, float))}
    if own:
        held_out = ", ".join(f"{k} {v:.4g}" for k, v in own.items())
    else:
        held_out = "val loss none (no val split)" if val_loss is None else f"val loss {val_loss:.4f}"
    since = [f"train loss {train_loss:.4f}"] if train_loss is not None else []
    since += [f"{seconds_per_step:.3g} s/step"] if seconds_per_step else []
    tail = " (untrained)" if step == 0 else f" ({', '.join(since)})" if since else ""
    return f"step {step}/{total_steps}: {held_out}{tail}"


# --- the language model: train() ---------------------------------------------------------------


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
        out_dir: run directory; created if missing; locked for the run (a second writer
            gets :class:`~bilinear_lens.locking.LockHeldError` naming the holder).
        resume: ``False``: start fresh (refused if ``out_dir`` already has checkpoints);
            ``True``: continue from the newest checkpoint in ``out_dir``; a path: continue
            from that checkpoint. The recipe may differ from the checkpoint's only where
            :mod:`~bilinear_lens.training.resume_rule` allows: ``[model]`` and ``[data]``
            (but ``data.cache_dir``) stay, ``[train]`` may change (e.g. more steps, but not
            fewer than the checkpoint's step). Resuming a finished run (the
            checkpoint's step is the schedule's last and ``final/`` holds that step) trains,
            evaluates and writes nothing: the result has ``already_finished`` set.
        progress: show progress on rank 0 (a bar on a terminal, periodic lines otherwise: :mod:`bilinear_lens.progress`).
        stop_at: stop after this many steps with a checkpoint, as if preempted, instead of
            finishing the schedule (the schedule still spans all ``train.steps``).

    Raises:
        ValueError: bad config or data (before any training step); ``FileNotFoundError``
            for a missing corpus or checkpoint; :class:`NonFiniteLossError` when training
            diverges; ``LockHeldError`` when another run writes ``out_dir``.
    """
    out_dir = Path(out_dir)
    tc = run_config.train
    env = read_environment(tc.device)
    if tc.batch_size % (env.world_size * tc.grad_accum):
        raise ValueError(
            f"train.batch_size={tc.batch_size} in {run_config.source} must be divisible by "
            f"world_size * train.grad_accum = {env.world_size} * {tc.grad_accum}"
        )
    check_stop_at(stop_at)
    threads_before = torch.get_num_threads()
    try:
        with claim_run_dir(out_dir, writer=env.is_main):
            ckpt_path = resolve_resume(resume, out_dir)
            env.init_group()
            if tc.num_threads:
                torch.set_num_threads(tc.num_threads)
            return _train(run_config, out_dir, ckpt_path, progress, stop_at, env)
    finally:
        torch.set_num_threads(threads_before)
        env.close()


def _prepare_data(
    run_config: RunConfig, ckpt_path: Optional[Path], env: DistEnv, progress: bool
) -> tuple[Any, TokenBlocks, Optional[TokenBlocks]]:
    """Tokenizer and blocks; rank 0 tokenizes (and fills the cache) first, the others then
    read it. A resumed run continues with exactly the checkpoint's tokenizer."""
    dc = run_config.data
    tokenizer_arg: Any = ckpt_path / TOKENIZER_FILE if ckpt_path is not None else (dc.tokenizer or None)
    if not env.is_main:
        env.barrier()
    data = prepare_data(
        dc.source, tokenizer=tokenizer_arg, vocab_size=dc.vocab_size, n_ctx=run_config.model.n_ctx,
        cache_dir=dc.cache_dir, val_fraction=dc.val_fraction, seed=dc.seed, max_docs=dc.max_docs or None,
        split=dc.split, max_chars=dc.max_chars or None, text_column=dc.text_column, streaming=dc.streaming,
        tokenizer_train_docs=dc.tokenizer_train_docs or None, progress=progress and env.is_main,
        documents=dc.documents,
    )
    if env.is_main:
        env.barrier()
    return data


def with_resolved_source(run_config: RunConfig) -> RunConfig:
    """``run_config`` with a local ``data.source`` and a ``data.tokenizer`` file as absolute
    paths (:func:`~bilinear_lens.data.corpus.resolved_source`): what the run records, so the
    recorded files are the ones trained with whatever directory later reads the record."""
    data = run_config.data
    source = resolved_source(data.source)
    tokenizer = str(Path(data.tokenizer).expanduser().resolve()) if data.tokenizer else ""
    if (source, tokenizer) == (data.source, data.tokenizer):
        return run_config
    return dataclasses.replace(run_config, data=dataclasses.replace(data, source=source, tokenizer=tokenizer))


def _check_resume_recipe(run_config: RunConfig, ckpt_path: Path) -> None:
    """Refuse a recipe whose ``[data]`` differs from the one the checkpoint was trained with
    (its ``run_config.toml``) where :func:`~bilinear_lens.training.resume_rule.resume_may_change`
    does not allow it: other data means other batches. ``[model]`` is checked against the
    checkpoint's ``config.json`` (:func:`_load_or_build_model`). A checkpoint without the
    file (written before it existed) has nothing to check against.

    Sources are compared resolved (``run_config``'s already is): a checkpoint recorded
    before sources were recorded absolute holds a relative path, read from the working
    directory as training read it. A checkpoint with a ``data_fingerprint.json`` also
    refuses a local file whose bytes differ from the ones it was trained on, and accepts a
    moved one (:func:`_moved_corpus`): a ``data.source`` naming another path whose bytes
    are the recorded ones is the same corpus."""
    saved_file = ckpt_path / RUN_CONFIG_FILE
    if not saved_file.is_file():
        return
    saved = with_resolved_source(load_run_config(saved_file))
    recorded = read_fingerprint(ckpt_path / DATA_FINGERPRINT_FILE)
    refused = refused_differences(saved, run_config, ("data",))
    moved = any(name == "data.source" for name, _, _ in refused) and _moved_corpus(saved, run_config, recorded,
                                                                                     ckpt_path)
    if moved:
        refused = [d for d in refused if d[0] != "data.source"]
    if refused:
        raise ValueError(f"cannot resume from {ckpt_path}: the recipe ({run_config.source}) differs from the "
                         f"checkpoint's ({saved_file}) in {format_differences(refused)}; on resume only [train] "
                         "values and data.cache_dir may change" + _moved_hint(refused, run_config, recorded))
    source = Path(run_config.data.source)
    if not moved and recorded is not None and is_local_source(run_config.data.source) and source.is_file():
        # (a moved corpus was just checked byte for byte: not hashed a second time)
        found = find_difference(recorded, source)
        if found is not None:
            raise ValueError(f"cannot resume from {ckpt_path}: it was trained on {recorded.path} "
                             f"({recorded.describe()}); {source} now differs ({found.describe()}); "
                             "resume on the file it was trained on, or start a new run")


def _moved_corpus(saved: RunConfig, given: RunConfig, recorded: Optional[FileFingerprint], ckpt_path: Path) -> bool:
    """Whether ``given``'s ``data.source`` is the checkpoint's corpus at another path: both
    local files, a fingerprint recorded, and the given file holding exactly the recorded
    bytes (SHA-256). A changed file is left to the byte check, which names both digests."""
    source = given.data.source
    if not (is_local_source(saved.data.source) and is_local_source(source)):
        return False
    if not holds_recorded_bytes(recorded, source):
        return False
    logger.info("the corpus moved: %s (recorded in %s) is now %s, the same bytes (%s); resuming on it",
                saved.data.source, ckpt_path, source, recorded.describe())
    return True


def _moved_hint(refused: list, given: RunConfig, recorded: Optional[FileFingerprint]) -> str:
    """Why a changed local ``data.source`` was not taken for the moved corpus (the only
    change a resume accepts there), or ``""``."""
    source = given.data.source
    if recorded is None or not any(name == "data.source" for name, _, _ in refused) or not is_local_source(source):
        return ""
    if not Path(source).is_file():
        return f"; a moved corpus is accepted, but {source} is not a file"
    found = find_difference(recorded, source)
    return (f"; a moved corpus is accepted when its bytes are the ones trained on ({recorded.describe()}), "
            f"but {source} holds others ({'?' if found is None else found.describe()})")


def _load_or_build_model(run_config: RunConfig, ckpt_path: Optional[Path], device: torch.device) -> BilinearTransformer:
    """The checkpoint's model (its config must equal the recipe's), or a fresh one."""
    if ckpt_path is None:
        return BilinearTransformer(run_config.model).to(device)
    saved_cfg = load_config(ckpt_path)
    if saved_cfg != run_config.model:
        diffs = {k: (v, getattr(run_config.model, k)) for k, v in saved_cfg.to_dict().items()
                 if getattr(run_config.model, k) != v}
        raise ValueError(
            f"cannot resume from {ckpt_path}: its model config differs from {run_config.source} "
            f"in {{field: (checkpoint, recipe)}} = {diffs}"
        )
    return load_model(ckpt_path, device=device)


def _language_model_task(
    run_config: RunConfig, model: BilinearTransformer, train_blocks: TokenBlocks,
    val_blocks: Optional[TokenBlocks], env: DistEnv, out_dir: Path,
    fingerprint: Optional[FileFingerprint] = None,
) -> TrainTask:
    """Next-token prediction on ``train_blocks``, validation on ``val_blocks``; each
    checkpoint also updates ``out_dir/run_config.toml`` (module docstring), and with a local
    corpus both hold its ``data_fingerprint.json`` (:mod:`bilinear_lens.data.fingerprint`)."""
    tc = run_config.train
    batches_per_epoch = train_blocks.batches_per_epoch(tc.batch_size)
    val_batch = tc.eval_batch_size or tc.batch_size // (env.world_size * tc.grad_accum)

    def write_model_files(directory: Path) -> None:
        write_model_dir(directory, model.cfg.to_dict(), model.state_dict(), model.tokenizer)
        run_config.save_toml(directory / RUN_CONFIG_FILE)
        if fingerprint is not None:
            write_fingerprint(directory / DATA_FINGERPRINT_FILE, fingerprint)

    def after_checkpoint(path: Path) -> None:  # the run's recipe is the newest checkpoint's
        if fingerprint is not None:  # first: the recipe that names the file never lacks its fingerprint
            write_fingerprint(out_dir / DATA_FINGERPRINT_FILE, fingerprint)
        atomic_write_text(out_dir / RUN_CONFIG_FILE, run_config.to_toml())

    return TrainTask(
        model=model,
        batch=lambda step: train_blocks.batch(step, tc.batch_size, env.rank, env.world_size, seed=tc.seed),
        loss=compute_loss,
        evaluate=lambda: None if val_blocks is None else evaluate(
            model, val_blocks, val_batch, tc.eval_batches, env.device, env.rank, env.world_size),
        write_model_files=write_model_files,
        data_state=lambda step: {"next_step": step, "epoch": step // batches_per_epoch, "batch_size": tc.batch_size,
                                 "seed": tc.seed, "world_size": env.world_size},
        tokens_per_step=tc.batch_size * run_config.model.n_ctx,
        after_checkpoint=after_checkpoint,
    )


def documents_status(run_config: RunConfig, train_blocks: TokenBlocks, val_blocks: Optional[TokenBlocks]) -> str:
    """The ``documents: ...`` status line (:func:`~bilinear_lens.data.split_summary.documents_line`)
    of the corpus ``prepare_data`` cached: how it was cut into documents and which are val."""
    dc = run_config.data
    n_val = 0 if val_blocks is None else int(val_blocks.meta.get("n_docs", 0))
    return documents_line(train_blocks.meta.get("source") or {"source": dc.source}, dc.documents,
                          int(train_blocks.meta.get("n_docs", 0)), n_val, dc.val_fraction, dc.seed)


def _finished_result(out_dir: Path, ckpt_path: Path, total_steps: int) -> Optional[TrainResult]:
    """The result of a run already finished at ``ckpt_path`` (:func:`finished_final`;
    ``unigram_entropy`` left to the caller), else ``None``."""
    final = finished_final(out_dir, ckpt_path, total_steps)
    if final is None:
        return None
    val_loss = read_train_state(final).metrics.get("val_loss")
    return TrainResult(final_checkpoint=final, val_loss=None if val_loss is None else float(val_loss),
                       steps=total_steps, metrics=read_metrics(out_dir / METRICS_FILE), out_dir=out_dir,
                       unigram_entropy=float("nan"), already_finished=True,
                       val_step=total_steps)  # the schedule's last step always evaluates


def _train(
    run_config: RunConfig, out_dir: Path, ckpt_path: Optional[Path], progress: bool,
    stop_at: Optional[int], env: DistEnv,
) -> TrainResult:
    tc = run_config.train
    run_config = with_resolved_source(run_config)  # recorded absolute: readers elsewhere find the same file
    if ckpt_path is not None:
        _check_resume_recipe(run_config, ckpt_path)
    tokenizer, train_blocks, val_blocks = _prepare_data(run_config, ckpt_path, env, progress)
    if env.is_main:
        logger.info("%s", documents_status(run_config, train_blocks, val_blocks))
    run_config = run_config.with_vocab_size(tokenizer.get_vocab_size())
    batches_per_epoch = train_blocks.batches_per_epoch(tc.batch_size)  # raises if batch > data
    total_steps = tc.steps or math.ceil(tc.epochs * batches_per_epoch)
    entropy_tokens = val_blocks.tokens if val_blocks is not None else train_blocks.tokens
    if ckpt_path is not None:
        setting = None if tc.steps else f"train.epochs={tc.epochs} ({total_steps} steps)"
        check_steps_reach(total_steps, read_train_state(ckpt_path).step, run_config.source, ckpt_path, setting)
        done = _finished_result(out_dir, ckpt_path, total_steps)
        if done is not None:
            if env.is_main:
                logger.info("%s is already finished at step %d; nothing to train", out_dir, done.steps)
            return dataclasses.replace(done, unigram_entropy=unigram_entropy(entropy_tokens))
    model = _load_or_build_model(run_config, ckpt_path, env.device)
    model.tokenizer = to_hf_tokenizer(tokenizer, model_max_length=run_config.model.n_ctx)
    model.train()
    task = _language_model_task(run_config, model, train_blocks, val_blocks, env, out_dir,
                                corpus_fingerprint(train_blocks))
    trainer = Trainer(task, make_optimizer(model, tc), tc, total_steps, env, out_dir, ckpt_path, progress)
    if ckpt_path is not None:
        apply_recipe_hyperparameters(trainer.optimizer, tc)
    if env.is_main:  # run_config.toml: written with each checkpoint (after_checkpoint)
        logger.info(
            "training %s params (%s MLP) on %s x %d process(es): %d steps of %d tokens, %d steps/epoch%s",
            f"{sum(p.numel() for p in model.parameters()):,}", run_config.model.mlp_kind, env.device,
            env.world_size, total_steps, task.tokens_per_step, batches_per_epoch,
            f", resuming at step {trainer.step}" if trainer.step else "",
        )
    final = trainer.fit(stop_at)
    if env.is_main:
        val = "none (no val split)" if trainer.last_val is None else f"{trainer.last_val:.4f}"
        if trainer.last_val is not None and trainer.last_val_step != trainer.step:  # a stop between evaluations
            val += f" (evaluated at step {'?' if trainer.last_val_step is None else trainer.last_val_step})"
        logger.info("step %d: val loss %s; checkpoint %s", trainer.step, val, final)
    return TrainResult(
        final_checkpoint=final, val_loss=trainer.last_val, steps=trainer.step, metrics=trainer.log.records,
        out_dir=out_dir, unigram_entropy=unigram_entropy(entropy_tokens), finished=trainer.finished,
        val_step=trainer.last_val_step,
    )
