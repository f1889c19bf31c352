"""Train a top-k SAE on one hook of a trained checkpoint, streaming activations.

Kept minimal and apart from :mod:`bilinear_lens.training.loop` (which is becoming a
reusable Trainer): the pieces a Trainer needs are separate functions here
(:func:`sae_step`, :func:`evaluate_sae`, :func:`save_sae_checkpoint`), and the loop in
:func:`train_sae` only wires them::

    setup   the frozen model, its token cache (:func:`~bilinear_lens.data.corpus.prepare_data`
            with the checkpoint's tokenizer), a fresh SAE and AdamW, or all of it restored
            from a checkpoint (``resume``)
    loop    for each step: cosine lr -> the step's token blocks -> their activations at the
            hook (computed now, dropped after the step: nothing is held beyond one step) ->
            MSE -> backward -> decoder grads made tangent to the unit sphere -> AdamW ->
            decoder rows renormalised -> dead-feature counters -> log / eval / checkpoint
    finish  held-out evaluation, ``<out>/final`` (an SAELens-format SAE directory)

Run directory::

    sae_recipe.json             the recipe and the model checkpoint it was trained on
    metrics.jsonl               per logged step: mse, explained_variance, l0, dead_fraction,
                                lr, tokens, elapsed_s (+ val_* at evaluations)
    checkpoints/step_000500/    SAE files + train_state.* (optimizer, RNG, dead counters)
    final/                      the SAE: ``load_sae(out)`` or ``load_sae(out / "final")``

Exact resume: a step's blocks are a pure function of the step
(:meth:`~bilinear_lens.data.corpus.TokenBlocks.batch`), the lr too, and checkpoints hold
the weights, AdamW moments, RNG states and dead-feature counters.

Default hooks (see :mod:`bilinear_lens.sae.recipe` for the paper's other settings): the
MLP's input side is ``blocks.{l}.hook_resid_mid`` (the residual stream the MLP reads,
before ``ln2``: a residual-basis SAE, so its features are also directions for any later
layer, and :func:`~bilinear_lens.sae.features.input_feature_basis` maps them through
``ln2``); the output side is ``blocks.{l}.hook_resid_post`` (what later layers and the
unembedding read; the paper's choice). ``hook_mlp_out`` works too and isolates the MLP's
write, but its features then describe one layer's output only.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from bilinear_lens.models.checkpoint import atomic_directory, write_json
from bilinear_lens.sae.config import SAEConfig
from bilinear_lens.sae.model import SAE, hook_width, load_sae, write_sae_files
from bilinear_lens.sae.recipe import SAERecipe, SAESpec
from bilinear_lens.training.loop import (  # the model trainer's layout, schedule and device rule, reused
    # (_resolve_device / _step_dir_name: to become public with the shared Trainer)
    CHECKPOINTS_DIR,
    FINAL_DIR,
    METRICS_FILE,
    _resolve_device,
    _step_dir_name,
    iter_metrics,
    latest_checkpoint,
    learning_rate,
    list_checkpoints,
)
from bilinear_lens.training.state import (
    TrainState,
    capture_rng_state,
    read_train_state,
    restore_rng_state,
    write_train_state,
)

RECIPE_FILE = "sae_recipe.json"


@dataclass
class SAETrainResult:
    final: Path
    steps: int
    val_metrics: dict[str, float]
    metrics: list[dict[str, Any]]


def stop_layer(hook: str, n_layers: int) -> Optional[int]:
    """Blocks the forward must run to reach ``hook`` (``None``: the whole model)."""
    parts = hook.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return min(int(parts[1]) + 1, n_layers)
    return 0 if hook in ("hook_embed", "hook_pos_embed") else None


@torch.no_grad()
def hook_activations(model: Any, blocks: Int[Tensor, "batch n_ctx_plus_1"], hook: str) -> Float[Tensor, "tokens d_in"]:
    """Activations at ``hook`` for every input position of ``blocks`` (``blocks[:, :-1]``)."""
    stop = stop_layer(hook, model.cfg.n_layers)
    kwargs = {} if stop is None else {"stop_at_layer": stop}
    _, cache = model.run_with_cache(blocks[:, :-1], names_filter=[hook], **kwargs)
    return cache[hook].reshape(-1, cache[hook].shape[-1])


@torch.no_grad()
def init_sae(cfg: SAEConfig, first_batch: Tensor, spec: SAESpec, seed: int) -> SAE:
    """Unit-norm random decoder rows, encoder = decoder^T, ``b_enc = 0`` (the paper's init),
    ``b_dec`` the mean of the first batch if ``init_b_dec_to_mean`` (else 0)."""
    sae = SAE(cfg)
    gen = torch.Generator().manual_seed(seed)
    sae.W_dec.copy_(torch.randn(cfg.d_sae, cfg.d_in, generator=gen, dtype=sae.W_dec.dtype))
    sae.normalize_decoder()
    sae.W_enc.copy_(sae.W_dec.T)
    if spec.init_b_dec_to_mean:
        sae.b_dec.copy_(first_batch.mean(0))
    return sae


def reconstruction_metrics(x: Tensor, x_hat: Tensor, f: Tensor) -> dict[str, float]:
    """``mse`` (mean over tokens and dims), ``explained_variance`` ``1 - sum|x - x_hat|^2 /
    sum|x - mean(x)|^2`` (over the tokens given) and ``l0`` (mean active features per token)."""
    err = (x - x_hat).pow(2).sum()
    var = (x - x.mean(0)).pow(2).sum()
    return {"mse": float(err / x.numel()), "explained_variance": float(1 - err / var),
            "l0": float((f > 0).sum(-1).float().mean())}


def sae_step(sae: SAE, optimizer: torch.optim.Optimizer, x: Tensor, grad_clip: float = 0.0) -> tuple[Tensor, Tensor]:
    """One update on activations ``x``: MSE loss, decoder gradient projected onto the tangent
    space of the unit sphere (the paper's constrained Adam), optional clipping, AdamW, rows
    renormalised. Returns ``(reconstruction, feature activations)`` (detached)."""
    f = sae.encode(x)
    x_hat = sae.decode(f)
    loss = (x_hat - x).pow(2).sum(-1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        unit = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
        sae.W_dec.grad -= (sae.W_dec.grad * unit).sum(-1, keepdim=True) * unit
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    optimizer.step()
    sae.normalize_decoder()
    return x_hat.detach(), f.detach()


@torch.no_grad()
def evaluate_sae(sae: SAE, model: Any, val_blocks: Any, batch_size: int, n_batches: int) -> dict[str, float]:
    """:func:`reconstruction_metrics` over the first ``n_batches`` held-out batches (0: all),
    keys ``val_*``. Activations are concatenated: their memory is the evaluated blocks'."""
    xs = []
    for i, blocks in enumerate(val_blocks.eval_batches(batch_size)):
        if n_batches and i == n_batches:
            break
        xs.append(hook_activations(model, blocks.to(sae.W_dec.device), sae.cfg.hook_name))
    x = torch.cat(xs)
    f = sae.encode(x)
    return {f"val_{k}": v for k, v in reconstruction_metrics(x, sae.decode(f), f).items()}


def save_sae_checkpoint(path: Path, sae: SAE, state: TrainState) -> None:
    """An SAELens-format SAE directory plus the training state, written atomically."""
    with atomic_directory(path) as tmp:
        write_sae_files(tmp, sae)
        write_train_state(tmp, state)


def _setup(model_path: Path, recipe: SAERecipe, progress: bool) -> tuple[Any, Any, Any]:
    """The frozen model and the train / val token blocks of its corpus (its own tokenizer)."""
    from bilinear_lens.data.corpus import prepare_data
    from bilinear_lens.models.model import BilinearTransformer

    device = _resolve_device(recipe.train.device, 0)
    model = BilinearTransformer.from_pretrained(model_path, device=device).eval().requires_grad_(False)
    hook_width(model, recipe.sae.hook)  # an unknown hook fails here, before any data is read
    tokenizer_file = model_path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{model_path} has no tokenizer.json: the SAE trainer reads the model's corpus")
    dc = recipe.data
    if dc.tokenizer:
        raise ValueError(f"data.tokenizer={dc.tokenizer!r} in {recipe.source}: the SAE trainer always uses the "
                         f"checkpoint's tokenizer ({tokenizer_file}); leave it out")
    _, train_blocks, val_blocks = prepare_data(
        dc.source, tokenizer=tokenizer_file, n_ctx=model.cfg.n_ctx, cache_dir=dc.cache_dir,
        val_fraction=dc.val_fraction, seed=dc.seed, max_docs=dc.max_docs or None, split=dc.split,
        max_chars=dc.max_chars or None, text_column=dc.text_column, streaming=dc.streaming, progress=progress,
    )
    if val_blocks is None:
        raise ValueError(f"data.val_fraction=0 in {recipe.source}: the SAE trainer needs held-out blocks to evaluate")
    return model, train_blocks, val_blocks


def _resume_point(out_dir: Path, resume: Union[bool, str, Path]) -> Optional[Path]:
    if resume is False:
        if latest_checkpoint(out_dir) is not None or (out_dir / FINAL_DIR).exists():
            raise FileExistsError(f"{out_dir} already holds an SAE run; pass resume=True (CLI: --resume) or another --out")
        return None
    path = latest_checkpoint(out_dir) if resume is True else Path(resume)
    if path is None or not (path / "train_state.json").is_file():
        raise FileNotFoundError(f"nothing to resume in {out_dir if path is None else path}: no SAE training checkpoint")
    return path


@dataclass
class _Run:
    """Everything that changes during a run (what a checkpoint restores)."""

    sae: SAE
    optimizer: torch.optim.AdamW
    step: int
    since_fired: Tensor  # [d_sae] steps since each feature last fired
    tokens: int
    elapsed_before: float


def _start(model: Any, train_blocks: Any, recipe: SAERecipe, ckpt: Optional[Path]) -> _Run:
    """A fresh SAE and optimizer, or both restored from ``ckpt`` with the RNG and counters."""
    spec, tc = recipe.sae, recipe.train
    d_in = hook_width(model, spec.hook)
    sae_cfg = SAEConfig(d_in=d_in, d_sae=spec.expansion * d_in, hook_name=spec.hook, k=spec.k,
                        metadata={"context_size": model.cfg.n_ctx})
    torch.manual_seed(tc.seed)
    if ckpt is None:
        first = hook_activations(model, train_blocks.batch(0, tc.batch_size, seed=tc.seed).to(model.W_E.device), spec.hook)
        sae = init_sae(sae_cfg, first.cpu(), spec, tc.seed)
    else:
        sae = load_sae(ckpt)
        if sae.cfg != sae_cfg:
            raise ValueError(f"cannot resume from {ckpt}: its SAE config {sae.cfg} differs from the recipe's {sae_cfg}")
    sae = sae.to(model.W_E.device)
    optimizer = torch.optim.AdamW(sae.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                                  weight_decay=tc.weight_decay)
    if ckpt is None:
        return _Run(sae, optimizer, 0, torch.zeros(sae_cfg.d_sae, dtype=torch.long, device=model.W_E.device), 0, 0.0)
    state = read_train_state(ckpt)
    optimizer.load_state_dict(state.optimizer)
    if state.rng is not None:
        restore_rng_state(state.rng)
    since_fired = torch.tensor(state.data["since_fired"], dtype=torch.long, device=model.W_E.device)
    return _Run(sae, optimizer, state.step, since_fired,
                int(state.metrics["tokens"]), float(state.metrics["elapsed_s"]))


def _checkpoint(path: Path, run: _Run, elapsed: float) -> None:
    state = TrainState(step=run.step, optimizer=run.optimizer.state_dict(), rng=capture_rng_state(),
                       data={"next_step": run.step, "since_fired": run.since_fired.tolist()},
                       metrics={"tokens": run.tokens, "elapsed_s": elapsed})
    save_sae_checkpoint(path, run.sae, state)


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def train_sae(
    checkpoint: Union[str, Path], out_dir: Union[str, Path], recipe: SAERecipe,
    resume: Union[bool, str, Path] = False, progress: bool = True, stop_at: Optional[int] = None,
) -> SAETrainResult:
    """Train a top-k SAE on ``recipe.sae.hook`` of the model at ``checkpoint`` into
    ``out_dir`` (module docstring). ``resume``: ``True`` for the newest checkpoint of
    ``out_dir``, or a checkpoint path. ``stop_at``: stop after that step with a checkpoint."""
    out_dir, checkpoint = Path(out_dir), Path(checkpoint)
    ckpt = _resume_point(out_dir, resume)
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"stop_at must be >= 1, got {stop_at}")
    threads_before = torch.get_num_threads()
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    try:
        model, train_blocks, val_blocks = _setup(checkpoint, recipe, progress)
        run = _start(model, train_blocks, recipe, ckpt)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / RECIPE_FILE, {"checkpoint": str(checkpoint), **recipe.to_dict()})
        records = [r for r in iter_metrics(out_dir) if r["step"] <= run.step] if ckpt is not None else []
        _write_metrics(out_dir / METRICS_FILE, records)  # drops records past a resumed checkpoint
        return _loop(model, train_blocks, val_blocks, recipe, run, out_dir, records, progress, stop_at)
    finally:
        torch.set_num_threads(threads_before)


def _loop(model: Any, train_blocks: Any, val_blocks: Any, recipe: SAERecipe, run: _Run, out_dir: Path,
          records: list[dict[str, Any]], progress: bool, stop_at: Optional[int]) -> SAETrainResult:
    cfg, hook = recipe.train, recipe.sae.hook
    start = time.perf_counter()
    elapsed = lambda: run.elapsed_before + time.perf_counter() - start  # noqa: E731
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    val: dict[str, float] = {}
    bar = tqdm(total=cfg.steps, initial=run.step, desc="sae", unit="step", disable=None if progress else True)
    while run.step < end:
        lr = learning_rate(run.step, cfg, cfg.steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        x = hook_activations(model, train_blocks.batch(run.step, cfg.batch_size, seed=cfg.seed).to(model.W_E.device), hook)
        x_hat, f = sae_step(run.sae, run.optimizer, x, cfg.grad_clip)
        run.step, run.tokens = run.step + 1, run.tokens + x.shape[0]
        run.since_fired = torch.where((f > 0).any(0), 0, run.since_fired + 1)
        if (cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == cfg.steps:
            val = evaluate_sae(run.sae, model, val_blocks, cfg.batch_size, cfg.eval_batches)
        if (cfg.log_every and run.step % cfg.log_every == 0) or run.step == end or val:
            record = {"step": run.step, **reconstruction_metrics(x, x_hat, f), "lr": lr,
                      "dead_fraction": float((run.since_fired >= recipe.sae.dead_after_steps).float().mean()),
                      "tokens": run.tokens, "elapsed_s": round(elapsed(), 3), **val}
            records.append(record)
            with open(out_dir / METRICS_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            bar.set_postfix(ev=f"{record['explained_variance']:.3f}", l0=f"{record['l0']:.1f}")
            val = {}
        if (cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0) or run.step == end:
            _checkpoint(out_dir / CHECKPOINTS_DIR / _step_dir_name(run.step), run, elapsed())
            for _, old in list_checkpoints(out_dir)[: -cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        bar.update(1)
    bar.close()
    final = out_dir / CHECKPOINTS_DIR / _step_dir_name(run.step)
    if run.step >= cfg.steps:
        final = out_dir / FINAL_DIR
        _checkpoint(final, run, elapsed())
    last_val = next((r for r in reversed(records) if "val_explained_variance" in r), {})
    return SAETrainResult(final, run.step, {k: v for k, v in last_val.items() if k.startswith("val_")}, records)
