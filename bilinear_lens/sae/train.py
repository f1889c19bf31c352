"""Train a top-k SAE on one hook of a trained checkpoint, streaming activations, through
the shared :class:`~bilinear_lens.training.loop.Trainer`.

The Trainer runs the loop (schedule, AdamW, NaN/explosion guard, metrics.jsonl, progress
bar, atomic checkpoints with exact resume, the run-directory lock and the cleanup of dead
writers' temporaries); :class:`SAETraining` is the SAE's :class:`TrainTask`::

    batch(step)        the step's token blocks of the cache (a pure function of the step)
    loss(sae, blocks)  the frozen model's activations at the hook for those blocks (computed
                       now, dropped after the step: memory is one step's activations) ->
                       top-k SAE -> |x - x_hat|^2 summed over d_in, mean over tokens;
                       features that fired are noted
    (backward)         decoder gradients made tangent to the unit sphere (a gradient hook
                       on W_dec: the paper's constrained Adam)
    after_step(step)   decoder rows renormalised; dead-feature counters advanced
    evaluate()         held-out MSE, explained variance, L0 (``val_*`` fields)
    data_state(step)   the data position and the dead-feature counters (restored on resume)
    write_model_files  the SAE in SAELens format (cfg.json, sae_weights.safetensors)

Before the first step of a fresh run, ``b_dec`` starts at the mean of the first batch's
activations (:func:`init_sae`).

Resume (:func:`train_sae` with ``resume``): without a recipe the run's saved
``sae_recipe.json`` is used; a recipe that is given must equal it except where
:func:`~bilinear_lens.training.resume_rule.resume_may_change` allows (``[train]`` values, e.g. more
steps; ``data.cache_dir``), else the run is refused with one line naming each differing
value. A run whose checkpoint is already at ``train.steps`` with ``final/`` written is
finished: resuming it trains nothing and writes nothing (:attr:`SAETrainResult.already_finished`).
Extending a finished run (more ``train.steps``) replaces ``final/`` when it ends, with a
warning first. A fresh run refuses a directory that holds ``final/``.

Run directory (the model trainer's layout, :mod:`bilinear_lens.training.run_dir`)::

    sae_recipe.json             the recipe (its [data] resolved: the text it trains on,
                                with "data_origin") and the model checkpoint of the newest SAE
                                checkpoint (written atomically right after each
                                checkpoint, never before: a resume with a changed recipe
                                that fails before its first checkpoint leaves it as it was)
    metrics.jsonl               per logged step: train_loss (mean since the last record),
                                mse, explained_variance, l0 (the step's batch),
                                dead_fraction, lr, tokens, tokens_per_s, elapsed_s
                                (+ val_loss, val_mse, val_explained_variance, val_l0 at
                                evaluations)
    checkpoints/step_000500/    SAE files + train_state.* (optimizer, RNG, dead counters)
    final/                      the SAE: ``load_sae(out)`` or ``load_sae(out / "final")``
    .lock                       while a run writes here

Default hooks (see :mod:`bilinear_lens.sae.recipe` for the paper's other settings): the
MLP's input side is ``blocks.{l}.hook_resid_mid`` (the residual stream the MLP reads,
before ``ln2``: a residual-basis SAE, so its features are also directions for any later
layer, and :func:`~bilinear_lens.sae.features.input_feature_basis` maps them through
``ln2``); the output side is ``blocks.{l}.hook_resid_post`` (what later layers and the
unembedding read; the paper's choice). ``hook_mlp_out`` works too and isolates the MLP's
write, but its features then describe one layer's output only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from bilinear_lens.data.split_summary import document_count
from bilinear_lens.files.atomic import atomic_write_text
from bilinear_lens.files.names import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.sae.config import SAEConfig
from bilinear_lens.sae.model import SAE, hook_width, load_sae, write_sae_files
from bilinear_lens.sae.recipe import (
    MODEL_DATA,
    NO_RECORD,
    RECIPE_FILE,
    SAERecipe,
    SAESpec,
    load_saved_recipe,
    recipe_differences,
    resolve_sae_data,
    saved_model_checkpoint,
)
from bilinear_lens.distributed import DistEnv, read_environment
from bilinear_lens.training.loop import TrainTask, Trainer, apply_recipe_hyperparameters, make_optimizer
from bilinear_lens.training.metrics import read_metrics
from bilinear_lens.training.resume_rule import (
    check_steps_reach,
    field_differences,
    finished_final,
    format_differences,
    resume_may_change,
)
from bilinear_lens.training.run_dir import FINAL_DIR, check_stop_at, METRICS_FILE, claim_run_dir, resolve_resume
from bilinear_lens.training.state import read_train_state

logger = logging.getLogger(__name__)


@dataclass
class SAETrainResult:
    """What :func:`train_sae` returns: ``final`` (``out/final``, or the step checkpoint
    where ``stop_at`` stopped), ``steps`` done, ``val_metrics`` (the ``val_*`` fields of
    the last evaluation) and every record of ``metrics.jsonl``. ``already_finished``: the
    resumed run was finished before this call, which trained and wrote nothing."""

    final: Path
    steps: int
    val_metrics: dict[str, float]
    metrics: list[dict[str, Any]]
    already_finished: bool = False


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


class SAETraining:
    """The SAE's half of a training run (module docstring): state that a step changes
    besides the weights and optimizer is ``since_fired`` (``[d_sae]`` steps since each
    feature last fired), saved in the checkpoint's data state."""

    def __init__(self, model: Any, sae: SAE, train_blocks: Any, val_blocks: Any, recipe: SAERecipe):
        self.model, self.sae, self.recipe = model, sae, recipe
        self.train_blocks, self.val_blocks = train_blocks, val_blocks
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.W_dec.device)
        self.fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=sae.W_dec.device)
        self.last_step: Optional[tuple[Tensor, Tensor, Tensor]] = None  # (x, x_hat, f) of the last step
        self.val: dict[str, float] = {}

    def batch(self, step: int) -> Int[Tensor, "batch n_ctx_plus_1"]:
        tc = self.recipe.train
        return self.train_blocks.batch(step, tc.batch_size, seed=tc.seed)

    def loss(self, sae: torch.nn.Module, blocks: Int[Tensor, "batch n_ctx_plus_1"]) -> Tensor:
        """``mean_t |x_t - x_hat_t|^2`` over the blocks' activations ``x`` at the hook."""
        x = hook_activations(self.model, blocks, self.recipe.sae.hook)
        f = sae.encode(x)
        x_hat = sae.decode(f)
        self.fired |= (f > 0).any(0)
        self.last_step = (x, x_hat.detach(), f.detach())
        return (x_hat - x).pow(2).sum(-1).mean()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Back onto the constraint (unit decoder rows); advance the dead-feature counters."""
        self.sae.normalize_decoder()
        self.since_fired = torch.where(self.fired, 0, self.since_fired + 1)
        self.fired.zero_()

    def evaluate(self) -> float:
        """Held-out metrics (kept for the record); returns the loss's value on them."""
        tc = self.recipe.train
        self.val = evaluate_sae(self.sae, self.model, self.val_blocks, tc.batch_size, tc.eval_batches)
        return self.val["val_mse"] * self.sae.cfg.d_in  # mse averages over d_in too; the loss sums it

    def record_fields(self, evaluated: bool) -> dict[str, Any]:
        """The last step's reconstruction metrics, the dead fraction, and ``val_*``."""
        dead = float((self.since_fired >= self.recipe.sae.dead_after_steps).float().mean())
        step_metrics = reconstruction_metrics(*self.last_step) if self.last_step is not None else {}
        return {**step_metrics, "dead_fraction": dead, **(self.val if evaluated else {})}

    def data_state(self, step: int) -> dict[str, Any]:
        tc = self.recipe.train
        return {"next_step": step, "batch_size": tc.batch_size, "seed": tc.seed,
                "since_fired": self.since_fired.tolist()}

    def load_data_state(self, data: dict[str, Any]) -> None:
        counts = data.get("since_fired")
        if not isinstance(counts, list) or len(counts) != self.sae.cfg.d_sae:
            raise CheckpointError(f"training state data.since_fired must be a list of {self.sae.cfg.d_sae} "
                                  f"counters (one per feature), got {type(counts).__name__}")
        self.since_fired = torch.tensor(counts, dtype=torch.long, device=self.sae.W_dec.device)

    def task(self) -> TrainTask:
        return TrainTask(
            model=self.sae, batch=self.batch, loss=self.loss, evaluate=self.evaluate,
            write_model_files=lambda directory: write_sae_files(directory, self.sae),
            data_state=self.data_state, tokens_per_step=self.recipe.train.batch_size * self.model.cfg.n_ctx,
            after_step=self.after_step, load_data_state=self.load_data_state, record_fields=self.record_fields,
            baseline_eval=False,  # records start with training metrics, as the SAE's log always has
        )


@contextlib.contextmanager
def tangent_decoder_gradients(sae: SAE) -> Iterator[None]:
    """While inside, each backward pass replaces ``grad W_dec[i]`` by its component tangent
    to the unit sphere at ``W_dec[i]``: ``g - (g . u) u`` with ``u = W_dec[i] / |W_dec[i]|``
    (linear, so per-micro-batch projections sum to the projection of the sum)."""

    def project(grad: Tensor) -> Tensor:
        unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
        return grad - (grad * unit).sum(-1, keepdim=True) * unit

    handle = sae.W_dec.register_hook(project)
    try:
        yield
    finally:
        handle.remove()


def _setup(model_path: Path, recipe: SAERecipe, device: torch.device, progress: bool) -> tuple[Any, Any, Any]:
    """The frozen model and the train / val token blocks of its corpus (its own tokenizer)."""
    from bilinear_lens.data.corpus import prepare_data
    from bilinear_lens.models.model import BilinearTransformer

    model = BilinearTransformer.from_pretrained(model_path, device=device).eval().requires_grad_(False)
    hook_width(model, recipe.sae.hook)  # an unknown hook fails here, before any data is read
    tokenizer_file = model_path / TOKENIZER_FILE
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
        documents=dc.documents,
    )
    if val_blocks is None:
        raise ValueError(f"data.val_fraction=0 in {recipe.source}: the SAE trainer needs held-out blocks to evaluate")
    return model, train_blocks, val_blocks


def sae_text_line(recipe: SAERecipe, train_blocks: Any, val_blocks: Any) -> str:
    """The ``SAE text: ...`` status line: which text a resolved recipe trains on (the model's
    training data, the recipe's ``data.source``, or the synthetic fallback), e.g.
    ``SAE text: the model's training data (/abs/stories.txt, documents: endoftext), 714 documents``.
    Documents are counted from the token cache's sidecars (:func:`document_count`: a whole
    file cut into a train head and a val tail is 1)."""
    dc = recipe.data
    spec = train_blocks.meta.get("source") or {}
    n = document_count(spec, int(train_blocks.meta.get("n_docs", 0)),
                       0 if val_blocks is None else int(val_blocks.meta.get("n_docs", 0)))
    label, details = ("synthetic stories", [f"data.seed {dc.seed}"]) if dc.source == "synthetic" else (dc.source, [])
    if spec.get("documents"):
        details.append(f"documents: {spec['documents']}")
    if recipe.data_origin == MODEL_DATA:
        what = f"the model's training data ({', '.join([label, *details])})"
    else:
        why = "fallback" if recipe.data_origin == NO_RECORD else "recipe data.source"
        what = f"{label} ({', '.join([why, *details])})"
    return f"SAE text: {what}, {n} document{'' if n == 1 else 's'}" + (f" [{recipe.data_note}]" if recipe.data_note else "")


def sae_training_metadata(model_path: Path, model: Any, recipe: SAERecipe) -> dict[str, Any]:
    """SAELens' metadata for an SAE trained here: ``model_name`` (the model checkpoint as
    given), ``context_size``, ``dataset_path`` (``data.source``) and ``prepend_bos`` = false:
    the trainer reads packed blocks (documents joined by the BOS/separator token), so a
    context does not start with a BOS of its own (SAELens' ``prepend_bos`` means it does)."""
    return {"model_name": str(model_path), "context_size": model.cfg.n_ctx,
            "dataset_path": recipe.data.source, "prepend_bos": False}


def _initial_sae(model: Any, train_blocks: Any, recipe: SAERecipe, ckpt: Optional[Path],
                 model_path: Optional[Path] = None) -> SAE:
    """A fresh SAE (:func:`init_sae` on the first batch), or the checkpoint's (its config
    must equal the recipe's except in metadata, which is descriptive and is renewed: runs
    saved before the metadata grew resume too)."""
    spec, tc = recipe.sae, recipe.train
    d_in = hook_width(model, spec.hook)
    metadata = sae_training_metadata(model_path, model, recipe) if model_path is not None else {"context_size": model.cfg.n_ctx}
    sae_cfg = SAEConfig(d_in=d_in, d_sae=spec.expansion * d_in, hook_name=spec.hook, k=spec.k, metadata=metadata)
    if ckpt is None:
        first = hook_activations(model, train_blocks.batch(0, tc.batch_size, seed=tc.seed).to(model.W_E.device), spec.hook)
        return init_sae(sae_cfg, first.cpu(), spec, tc.seed).to(model.W_E.device)
    sae = load_sae(ckpt)
    if dataclasses.replace(sae.cfg, metadata={}) != dataclasses.replace(sae_cfg, metadata={}):
        raise ValueError(f"cannot resume from {ckpt}: its SAE (saved) differs from the recipe's (given) in "
                         f"{format_differences(field_differences(sae.cfg, sae_cfg))}")
    sae.cfg = sae_cfg
    return sae.to(model.W_E.device)


def _last_val(records: list[dict[str, Any]]) -> dict[str, float]:
    last = next((r for r in reversed(records) if "val_explained_variance" in r), {})
    return {k: v for k, v in last.items() if k.startswith("val_")}


def _same_model(saved: Path, given: Path) -> bool:
    """Whether two model checkpoint paths name the same model: one directory, or two whose
    ``config.json`` and weights are byte-identical. A saved path that no longer exists (a
    moved run) cannot be told apart and counts as the same; the SAE config check (``d_in``,
    hook) still applies."""
    if not saved.is_dir() or saved.resolve() == given.resolve():
        return True
    return all((saved / name).is_file() and (given / name).is_file()
               and filecmp.cmp(saved / name, given / name, shallow=False)
               for name in (CONFIG_FILE, WEIGHTS_FILE))


def resume_recipe(out_dir: Path, checkpoint: Path, recipe: Optional[SAERecipe]) -> SAERecipe:
    """The recipe a resumed run in ``out_dir`` trains with: the saved ``sae_recipe.json``
    where ``recipe`` is ``None``, else ``recipe`` once checked against it (only values that
    :func:`~bilinear_lens.training.resume_rule.resume_may_change` allows may differ). ``checkpoint``
    must be the model the run was trained on. Raises ``ValueError`` naming every differing
    value with both its saved and its given value, ``FileNotFoundError`` where there is no
    saved recipe and none is given."""
    recipe_file = out_dir / RECIPE_FILE
    if not recipe_file.is_file() and recipe is not None:
        return recipe  # nothing to check against (a run directory from before the file existed)
    saved = load_saved_recipe(out_dir)
    saved_model = saved_model_checkpoint(out_dir)
    if saved_model is not None and not _same_model(Path(saved_model), checkpoint):
        raise ValueError(f"cannot resume {out_dir}: it was trained on another model: "
                         f"{format_differences([('checkpoint', saved_model, str(checkpoint))])}")
    if recipe is None:
        return saved
    refused = [d for d in recipe_differences(saved, recipe) if not resume_may_change(d[0])]
    if any(name == "data.source" for name, _, _ in refused) and _moved_model_data(saved, recipe, checkpoint):
        refused = [d for d in refused if d[0] != "data.source"]
    if refused:
        raise ValueError(f"cannot resume {out_dir}: the recipe ({recipe.source}) differs from the run's "
                         f"({recipe_file}) in {format_differences(refused)}; on resume only [train] values and "
                         "data.cache_dir may change (CLI: leave out --config and --hook to reuse the saved recipe)")
    return recipe


def _moved_model_data(saved: SAERecipe, given: SAERecipe, checkpoint: Path) -> bool:
    """Whether ``given``'s ``data.source`` is the saved run's text moved: the saved run reads
    the model's own local training file and the given path holds the bytes the model's
    ``data_fingerprint.json`` records (the one change of ``data.source`` a resume accepts)."""
    from bilinear_lens.data.corpus import is_local_source
    from bilinear_lens.data.fingerprint import holds_recorded_bytes
    from bilinear_lens.training.measured_text import recorded_fingerprint

    source = given.data.source
    if saved.data_origin != MODEL_DATA or not (is_local_source(saved.data.source) and is_local_source(source)):
        return False
    recorded = recorded_fingerprint(str(checkpoint))
    if not holds_recorded_bytes(recorded, source):
        return False
    logger.info("the model's training file moved: %s (saved) is now %s, the same bytes (%s); resuming on it",
                saved.data.source, source, recorded.describe())
    return True


def _finished_result(out_dir: Path, ckpt: Path, recipe: SAERecipe) -> Optional[SAETrainResult]:
    """The result of a run that is already finished at ``ckpt`` (:func:`finished_final`),
    else ``None``; a ``train.steps`` below the checkpoint's step is a ``ValueError``. Warns
    where a finished run is about to be extended."""
    steps = recipe.train.steps
    check_steps_reach(steps, read_train_state(ckpt).step, recipe.source, ckpt)
    final = finished_final(out_dir, ckpt, steps)
    if final is not None:
        records = read_metrics(out_dir / METRICS_FILE)
        return SAETrainResult(final, steps, _last_val(records), records, already_finished=True)
    if (out_dir / FINAL_DIR).is_dir():
        logger.warning("%s holds a finished SAE (step %d); this run trains to step %d and then replaces it",
                       out_dir / FINAL_DIR, read_train_state(out_dir / FINAL_DIR).step, steps)
    return None


def _write_recipe(out_dir: Path, checkpoint: Path, recipe: SAERecipe) -> None:
    text = json.dumps({"checkpoint": str(checkpoint), "data_origin": recipe.data_origin, **recipe.to_dict()},
                      indent=2, sort_keys=True) + "\n"
    atomic_write_text(out_dir / RECIPE_FILE, text)


def train_sae(
    checkpoint: Union[str, Path], out_dir: Union[str, Path], recipe: Optional[SAERecipe] = None,
    resume: Union[bool, str, Path] = False, progress: bool = True, stop_at: Optional[int] = None,
) -> SAETrainResult:
    """Train a top-k SAE on ``recipe.sae.hook`` of the model at ``checkpoint`` into
    ``out_dir`` (module docstring). ``resume``: ``True`` for the newest checkpoint of
    ``out_dir``, or a checkpoint path (``False``: a fresh run, refused where ``out_dir``
    already holds one). ``recipe``: ``None`` resumes with the run's saved recipe (a fresh
    run: the paper's defaults); its text is settled by
    :func:`~bilinear_lens.sae.recipe.resolve_sae_data` (no ``data.source``: the model's
    recorded training data) and named in one ``SAE text: ...`` log line; on resume a given recipe must match the saved one
    (:func:`resume_recipe`). A finished run resumes to nothing: no training, no file
    written, ``already_finished`` set. ``stop_at``: stop after that step with a checkpoint.

    Raises ``ValueError`` (bad recipe, hook or data; a recipe that differs from the run's
    where it may not), ``FileExistsError`` / ``FileNotFoundError`` (fresh run into a used
    directory / nothing to resume),
    :class:`~bilinear_lens.locking.LockHeldError` (another run writes ``out_dir``),
    :class:`~bilinear_lens.training.guard.NonFiniteLossError` (training diverged)."""
    out_dir, checkpoint = Path(out_dir), Path(checkpoint)
    check_stop_at(stop_at)
    # the torchrun check before the lock; the device is read again once the recipe is known
    env = read_environment(recipe.train.device if recipe is not None else "cpu")
    if env.enabled:
        raise ValueError(f"WORLD_SIZE={env.world_size}: the SAE trainer runs in one process (launch it without torchrun)")
    threads_before = torch.get_num_threads()
    try:
        with claim_run_dir(out_dir, writer=True):
            # a model training run (run_config.toml, no sae_recipe.json) is named as what it is
            holds = ("a model training run, not an SAE run" if (out_dir / "run_config.toml").is_file()
                     and not (out_dir / "sae_recipe.json").is_file() else "an SAE run")
            ckpt = resolve_resume(resume, out_dir, holds=holds)
            if ckpt is None:
                if (out_dir / FINAL_DIR).exists():
                    raise FileExistsError(f"{out_dir} already holds a finished SAE ({out_dir / FINAL_DIR}); resume it "
                                          "with --resume (Python: resume=True) or choose another output directory")
                recipe = resolve_sae_data(SAERecipe() if recipe is None else recipe, checkpoint)
            else:
                given = None if recipe is None else resolve_sae_data(recipe, checkpoint)
                recipe = resume_recipe(out_dir, checkpoint, given)
                if given is None:  # the saved recipe: its recorded training file checked again
                    recipe = resolve_sae_data(recipe, checkpoint)
                done = _finished_result(out_dir, ckpt, recipe)
                if done is not None:
                    return done
            env = read_environment(recipe.train.device)
            if recipe.train.num_threads:
                torch.set_num_threads(recipe.train.num_threads)
            return _train_sae(checkpoint, out_dir, recipe, ckpt, env, progress, stop_at)
    finally:
        torch.set_num_threads(threads_before)


def _train_sae(checkpoint: Path, out_dir: Path, recipe: SAERecipe, ckpt: Optional[Path], env: DistEnv,
               progress: bool, stop_at: Optional[int]) -> SAETrainResult:
    tc = recipe.train
    model, train_blocks, val_blocks = _setup(checkpoint, recipe, env.device, progress)
    (logger.warning if recipe.data_origin == NO_RECORD else logger.info)("%s", sae_text_line(recipe, train_blocks,
                                                                                               val_blocks))
    sae = _initial_sae(model, train_blocks, recipe, ckpt, model_path=checkpoint)
    training = SAETraining(model, sae, train_blocks, val_blocks, recipe)
    task = dataclasses.replace(training.task(), after_checkpoint=lambda path: _write_recipe(out_dir, checkpoint, recipe))
    trainer = Trainer(task, make_optimizer(sae, tc), tc, tc.steps, env, out_dir, ckpt, progress)
    if ckpt is not None:
        apply_recipe_hyperparameters(trainer.optimizer, tc)
    with tangent_decoder_gradients(sae):
        final = trainer.fit(stop_at)
    return SAETrainResult(final, trainer.step, _last_val(trainer.log.records), trainer.log.records)
