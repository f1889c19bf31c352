"""Batched single-neuron sweeps: ablate (:func:`ablation_sweep`) or patch
(:func:`patch_neurons`) each neuron of a layer on its own, many per forward pass.

The token batch is repeated ``k`` times along the batch dim and copy ``j`` gets neuron ``j``
replaced. Copy ``j`` then computes the same float ops as a one-neuron forward pass, so
results match a one-at-a-time loop. On :class:`~bilinear_lens.models.model.BilinearTransformer`
the copies start at the replaced activation itself
(:meth:`~bilinear_lens.models.model.TransformerBlock.forward_from_mlp`): hook points before
it (earlier blocks, the layer's attention and ``ln2``, the MLP's input projections) see
only the unablated tokens, whose activations the sweep computes once, and only the hook
points after it see the ``k`` stacked copies. On a ``TransformerBridge`` every hook point
sees the copies.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.utilities import get_act_name

from bilinear_lens.activations.ablation.install import HookFn
from bilinear_lens.activations.ablation.metrics import MetricFn, evaluate, named_metrics, token_metrics
from bilinear_lens.activations.ablation.uncertainty import (
    Clusters,
    row_clusters,
    uncertainty_columns,
    uncertainty_record,
)
from bilinear_lens.activations.ablation.neuron_hooks import NeuronsLike, neuron_hook_name, neuron_indices
from bilinear_lens.activations.ablation.table import NeuronTable
from bilinear_lens.activations.ablation.values import Replacement, check_tokens, replacement
from bilinear_lens.activations.capture import capture_activations, run_capturing
from bilinear_lens.models.hook_names import mlp_hook_name
from bilinear_lens.models.model import TransformerBlock
from bilinear_lens.models.protocol import HookedModel
from bilinear_lens.weights.directions import TokenLike
from bilinear_lens.progress import progress_bar

# Tokens per forward pass that ablation_sweep / patch_neurons aim for when
# ablations_per_pass is not given: bounds the activations and logits held at once.
DEFAULT_TOKENS_PER_PASS = 8192

# (k neurons, replacement) -> logits [k * batch, pos, d_vocab] of k copies, copy j with neuron j replaced
CopiesForward = Callable[[Tensor, Replacement], Tensor]


def one_neuron_per_copy(neurons: Int[Tensor, "k"], values: Replacement) -> Callable[[Tensor], Tensor]:
    """``copies [k, batch, pos, d_mlp] -> copies`` with neuron ``neurons[j]`` of copy ``j`` set
    to its replacement value, written in place (pass a fresh tensor).

    Each copy holds what :func:`~bilinear_lens.activations.ablation.neuron_hooks.select_neurons_hook`
    gives a single-neuron run: the same replacement values at its neuron, the activation
    elsewhere. Writing ``k`` columns costs less than a ``where`` over every neuron of every copy.
    """
    k = neurons.shape[0]

    def replace(copies: Float[Tensor, "k batch pos d_mlp"]) -> Float[Tensor, "k batch pos d_mlp"]:
        new = values.values(copies.shape[1:], copies.dtype, copies.device)
        index = neurons.to(copies.device)
        own = new.expand(copies.shape[1:])[..., index].movedim(-1, 0)  # [k, batch, pos]: copy j's neuron
        copies[torch.arange(k, device=copies.device), ..., index] = own
        return copies

    return replace


def one_neuron_per_copy_hook(neurons: Int[Tensor, "k"], batch: int, values: Replacement) -> HookFn:
    """Hook for a batch of ``k`` stacked copies ``[k * batch, pos, d_mlp]``: copy ``j`` gets
    neuron ``neurons[j]`` replaced (out of place; see :func:`one_neuron_per_copy`)."""
    replace = one_neuron_per_copy(neurons, values)

    def ablate(activation: Float[Tensor, "k_batch pos d_mlp"], hook: object) -> Tensor:
        copies = activation.view(neurons.shape[0], batch, *activation.shape[1:]).clone()
        return replace(copies).view(activation.shape)

    return ablate


def resolve_ablations_per_pass(requested: Optional[int], tokens: Tensor) -> int:
    if requested is None:
        return max(1, DEFAULT_TOKENS_PER_PASS // max(1, tokens.numel()))
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"ablations_per_pass must be a positive int, got {requested!r}")
    return requested


def starts_inside_mlp(model: HookedModel, layer: int) -> bool:
    """Whether copies can restart inside layer ``layer``'s MLP: only where the block is ours
    (it has :meth:`~bilinear_lens.models.model.TransformerBlock.forward_from_mlp`); a
    ``TransformerBridge`` runs whole forwards."""
    return isinstance(model.blocks[layer], TransformerBlock)


def _full_forward(model: HookedModel, tokens: Int[Tensor, "batch pos"], layer: int, hook: str) -> CopiesForward:
    """Each copy is a whole forward pass of ``tokens`` with the hook at ``blocks.{layer}.mlp.{hook}``."""
    hook_name = mlp_hook_name(layer, hook)

    def forward(neurons: Int[Tensor, "k"], values: Replacement) -> Tensor:
        copies_hook = one_neuron_per_copy_hook(neurons, tokens.shape[0], values)
        return model.run_with_hooks(tokens.repeat(neurons.shape[0], 1), fwd_hooks=[(hook_name, copies_hook)])

    return forward


def _forward_from_mlp(model: HookedModel, tokens: Int[Tensor, "batch pos"], layer: int, hook: str) -> CopiesForward:
    """Each copy restarts at the ablated activation ``blocks.{layer}.mlp.{hook}`` of our model.

    Everything before that activation (the earlier blocks, the block's attention and
    ``ln2``, the MLP's input projections) is the same for every copy: it runs once on
    ``tokens``. Each copy then redoes only what follows, through the block's own
    :meth:`~bilinear_lens.models.model.TransformerBlock.forward_from_mlp` and the later
    blocks (``start_at_layer``).
    """
    block = model.blocks[layer]
    resid_name = get_act_name("resid_mid", layer)
    names = {name: mlp_hook_name(layer, name) for name in block.mlp.resume_inputs(hook)}
    clean = capture_activations(model, tokens, [resid_name, *names.values()], stop_at_layer=layer + 1)

    def forward(neurons: Int[Tensor, "k"], values: Replacement) -> Tensor:
        k = neurons.shape[0]
        # [k, batch, pos, d_mlp]: views of the clean activations; the ablated one is copied
        acts = {name: clean[full].expand(k, *clean[full].shape) for name, full in names.items()}
        acts[hook] = one_neuron_per_copy(neurons, values)(acts[hook].clone())
        # hook points see the copies stacked along batch: [k * batch, pos, d_mlp]
        stacked = {name: act.flatten(0, 1) for name, act in acts.items()}
        resid = block.forward_from_mlp(clean[resid_name].repeat(k, 1, 1), hook, stacked)
        return model(resid, start_at_layer=layer + 1)

    return forward


def copies_forward(model: HookedModel, tokens: Int[Tensor, "batch pos"], layer: int, hook: str) -> CopiesForward:
    """``forward(neurons, values) -> logits [k * batch, pos, d_vocab]`` of ``k`` copies of
    ``tokens``, copy ``j`` with neuron ``neurons[j]`` of ``blocks.{layer}.mlp.{hook}``
    replaced: restarting inside the MLP on our model, whole forwards otherwise. Hook points
    after the ablated activation fire once per pass with the copies stacked along batch."""
    return (_forward_from_mlp if starts_inside_mlp(model, layer) else _full_forward)(model, tokens, layer, hook)


def _sweep(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    hook: str,
    neurons: Int[Tensor, "n"],
    values: Replacement,
    metrics: Mapping[str, MetricFn],
    ablations_per_pass: int,
    progress: bool,
    desc: str,
    cluster_fns: Optional[Mapping[str, Callable[[Tensor], Tensor]]] = None,
) -> tuple[dict[str, Float[Tensor, "n"]], dict[str, Float[Tensor, "n G"]]]:
    """Metric values with each neuron replaced in turn, ``ablations_per_pass`` per forward,
    and the cluster sums of ``cluster_fns`` (``logits -> [G]`` per copy; ``[n, G]``, for
    standard errors).

    The copies compute the same operations on the same inputs as one-neuron forward
    passes, so the numbers are the same, whether they restart inside the MLP
    (:func:`_forward_from_mlp`, our model) or run from the tokens (:func:`_full_forward`).
    """
    batch = tokens.shape[0]
    out = {name: torch.empty(neurons.shape[0], dtype=torch.float64) for name in metrics}
    sums: dict[str, Tensor] = {}
    with torch.no_grad(), progress_bar(total=neurons.shape[0], desc=desc, unit="neuron", enabled=progress) as bar:
        forward = copies_forward(model, tokens, layer, hook)
        for start in range(0, neurons.shape[0], ablations_per_pass):
            chunk = neurons[start : start + ablations_per_pass]
            k = chunk.shape[0]
            logits = forward(chunk, values)
            for j, copy_logits in enumerate(logits.view(k, batch, *logits.shape[1:])):
                for name, value in evaluate(metrics, copy_logits).items():
                    out[name][start + j] = value
                for name, fn in (cluster_fns or {}).items():
                    cluster_sums = fn(copy_logits)
                    if name not in sums:
                        sums[name] = torch.empty(neurons.shape[0], cluster_sums.shape[0], dtype=torch.float64)
                    sums[name][start + j] = cluster_sums
            bar.update(k)
    return out, sums


def _all_or_given(neurons: Optional[NeuronsLike], d_mlp: int) -> Tensor:
    return torch.arange(d_mlp) if neurons is None else neuron_indices(neurons, d_mlp)


def ablation_sweep(
    model: HookedModel,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    neurons: Optional[NeuronsLike] = None,
    hook: str = "hook_post",
    method: str = "zero",
    reference: Optional[Int[Tensor, "ref_batch ref_pos"]] = None,
    seed: int = 0,
    metric: Union[None, MetricFn, Mapping[str, MetricFn]] = None,
    logit: Optional[TokenLike] = None,
    logit_diff: Optional[tuple[TokenLike, TokenLike]] = None,
    position: Optional[int] = -1,
    ablations_per_pass: Optional[int] = None,
    progress: bool = True,
    documents: Optional[Int[Tensor, "batch pos"]] = None,
) -> NeuronTable:
    """Effect of ablating each neuron of layer ``layer``'s MLP on its own.

    Columns: ``neuron``, ``delta_loss`` (ablated minus clean mean next-token loss over
    ``tokens``) and, when asked for, ``delta_logit`` (mean logit of token ``logit``),
    ``delta_logit_diff`` (mean ``logit[a] - logit[b]``) and ``delta_<name>`` for each
    custom ``metric`` (a TransformerLens-style ``logits -> scalar`` callable, ``"metric"``
    when unnamed, or a mapping name -> callable). Logit metrics read ``position``: ``-1``
    (default) is the last position, as for a prompt whose next token is the answer;
    ``None`` averages every position. Rows are in neuron order; use
    :meth:`NeuronTable.top`/:meth:`NeuronTable.sort_by` to rank them.

    Uncertainty (:mod:`~bilinear_lens.activations.ablation.uncertainty`): each built-in
    ``delta_X`` also has ``delta_X_se``, its standard error clustered by document
    (``documents``: each token's document id, e.g.
    :func:`~bilinear_lens.activations.ablation.uncertainty.document_ids` of packed text;
    default: each row its own cluster, which is ``std(row deltas) / sqrt(rows)``),
    ``delta_X_p``, the two-sided p-value of no effect (t with clusters - 1 degrees of
    freedom), and ``delta_X_q``, the Benjamini-Hochberg q-value over the swept neurons. Call
    an effect distinguishable from zero where ``q < 0.05``
    (:data:`~bilinear_lens.activations.ablation.uncertainty.DEFAULT_FDR`); fewer than two
    clusters give ``NaN``. ``table.uncertainty`` records the clustering.

    Batched: ``ablations_per_pass`` ablations share a forward pass by repeating ``tokens``
    along the batch dim (default: about :data:`DEFAULT_TOKENS_PER_PASS` tokens per pass).
    ``method="mean"``/``"resample"`` take values from ``reference`` (default: ``tokens``).
    Pass equal-length (unpadded) rows of at least 2 tokens (the loss predicts each next
    token): padding would count in the loss. Bad arguments raise a one-line ``ValueError``
    naming them (``tokens``, ``reference``, ``position``, ``documents``, ...).
    """
    check_tokens(tokens, d_vocab=model.cfg.d_vocab, min_pos=2)
    labels = cluster_labels(tokens, documents)
    hook_name = neuron_hook_name(model, layer, hook)
    indices = _all_or_given(neurons, model.cfg.d_mlp)
    reference = tokens if reference is None and method != "zero" else reference
    values = replacement(model, hook_name, method, reference, seed)
    metrics = named_metrics(model, tokens, metric, logit, logit_diff, position)
    per_value = token_metrics(model, tokens, logit, logit_diff, position)
    clusters = {name: Clusters.of(labels[:, tm.positions]) for name, tm in per_value.items()}
    cluster_fns = {name: (lambda logits, tm=tm, c=clusters[name]: c.sums(tm.values(logits)))
                   for name, tm in per_value.items()}
    per_pass = resolve_ablations_per_pass(ablations_per_pass, tokens)
    with torch.no_grad():
        clean_logits = model(tokens)
        baseline = evaluate(metrics, clean_logits)
        baseline_sums = {name: fn(clean_logits) for name, fn in cluster_fns.items()}
    desc = f"{method}-ablating {hook_name}"
    ablated, sums = _sweep(model, tokens, layer, hook, indices, values, metrics, per_pass, progress, desc, cluster_fns)
    columns = {"neuron": indices}
    columns.update({f"delta_{name}": deltas - baseline[name] for name, deltas in ablated.items()})
    # uncertainty after every delta column: the first value column stays the ranking default
    delta_sums = {name: s - baseline_sums[name] for name, s in sums.items()}
    columns.update(uncertainty_columns(columns, delta_sums, clusters))
    return NeuronTable(layer, hook, method, columns, baseline, uncertainty_record(documents, clusters))


def cluster_labels(tokens: Tensor, documents: Optional[Tensor]) -> Tensor:
    """``documents`` checked against ``tokens`` (same shape, integers), or one label per row."""
    if documents is None:
        return row_clusters(tokens)
    if not isinstance(documents, Tensor) or documents.shape != tokens.shape or documents.is_floating_point():
        shape = tuple(documents.shape) if isinstance(documents, Tensor) else type(documents).__name__
        raise ValueError(f"documents must be an integer tensor of the tokens' shape {tuple(tokens.shape)} "
                         f"(each token's document id), got {shape}")
    return documents.cpu()


def _check_patch_tokens(clean_tokens: Tensor, corrupted_tokens: Tensor, d_vocab: int) -> None:
    check_tokens(clean_tokens, "clean_tokens", d_vocab=d_vocab)
    check_tokens(corrupted_tokens, "corrupted_tokens", d_vocab=d_vocab)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(
            f"clean_tokens {tuple(clean_tokens.shape)} and corrupted_tokens {tuple(corrupted_tokens.shape)} "
            "must have the same shape (positions are patched one-to-one)"
        )


def patch_neurons(
    model: HookedModel,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    layer: int,
    neurons: Optional[NeuronsLike] = None,
    hook: str = "hook_post",
    *,
    metric: MetricFn,
    ablations_per_pass: Optional[int] = None,
    progress: bool = True,
) -> NeuronTable:
    """Activation patching of single neurons from a clean run into a corrupted run.

    As in TransformerLens' ``patching`` module: run ``corrupted_tokens`` with one neuron's
    activation at ``hook`` replaced by its value (same batch row and position) on
    ``clean_tokens``, and evaluate ``metric`` (``logits -> scalar``, e.g.
    :func:`~bilinear_lens.activations.ablation.metrics.logit_diff_metric`) on the patched
    logits. Columns: ``neuron``, ``effect`` (``patched - corrupted``), ``patched`` (the
    metric of the patched run) and ``normalized`` (``effect / (clean - corrupted)``: 1 means
    the neuron alone restores the clean metric; NaN or inf when clean and corrupted agree).
    ``baseline`` holds the ``clean`` and ``corrupted`` metric values. Batched like
    :func:`ablation_sweep`.
    """
    _check_patch_tokens(clean_tokens, corrupted_tokens, model.cfg.d_vocab)
    hook_name = neuron_hook_name(model, layer, hook)
    indices = _all_or_given(neurons, model.cfg.d_mlp)
    metrics = {"metric": metric}
    clean_logits, clean_act = run_capturing(model, clean_tokens, [hook_name], return_type="logits")
    with torch.no_grad():
        clean = evaluate(metrics, clean_logits)["metric"]
        corrupted = evaluate(metrics, model(corrupted_tokens))["metric"]
    values = Replacement("patch", clean_act[hook_name])
    per_pass = resolve_ablations_per_pass(ablations_per_pass, corrupted_tokens)
    desc = f"patching {hook_name}"
    patched = _sweep(model, corrupted_tokens, layer, hook, indices, values, metrics, per_pass, progress, desc)[0]["metric"]
    effect = patched - corrupted
    # effect first: the column NeuronTable.top ranks by default.
    columns = {"neuron": indices, "effect": effect, "patched": patched, "normalized": effect / (clean - corrupted)}
    return NeuronTable(layer, hook, "patch", columns, {"clean": clean, "corrupted": corrupted})
