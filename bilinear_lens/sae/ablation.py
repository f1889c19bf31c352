"""Neuron ablation measured on an SAE feature: which MLP neurons drive a feature.

:func:`~bilinear_lens.activations.ablation.ablation_sweep` ranks neurons by metrics of the
logits; an SAE feature is read at its own hook. :func:`feature_ablation_sweep` runs the
neuron sweep's own copies: ``ablations_per_pass`` copies of ``tokens`` share a forward
pass, copy ``j`` with neuron ``j`` replaced, restarting inside the ablated MLP on our model
(:func:`~bilinear_lens.activations.ablation.sweep.copies_forward`), and the SAE encodes every
copy's activation at its hook: the feature's activation ``f_i(x)``
(:meth:`~bilinear_lens.sae.model.SAE.encode`) averaged over all tokens, next to the mean
next-token loss, per copy. A hook upstream of the ablated activation does not fire in
the restarted copies; its feature value is the clean one (the ablation cannot reach it).
Each copy computes what a one-neuron hooked forward computes (tested against
:func:`~bilinear_lens.activations.ablation.ablate_neurons`, one neuron at a time).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from jaxtyping import Int
from torch import Tensor

from bilinear_lens.activations.ablation import NeuronTable, loss_metric
from bilinear_lens.activations.ablation.neuron_hooks import NeuronsLike, neuron_hook_name, neuron_indices
from bilinear_lens.activations.ablation.sweep import copies_forward, resolve_ablations_per_pass
from bilinear_lens.activations.ablation.values import check_tokens, replacement
from bilinear_lens.activations.capture import run_capturing
from bilinear_lens.models.hook_names import check_hook_names
from bilinear_lens.weights.directions import FeatureDirection
from bilinear_lens.progress import progress_bar


def _feature_and_loss(model: Any, tokens: Tensor, feature: FeatureDirection) -> tuple[float, float]:
    """Clean mean feature activation and mean next-token loss."""
    hook = feature.sae.cfg.hook_name
    logits, acts = run_capturing(model, tokens, [hook], return_type="logits")
    return float(feature.sae.encode(acts[hook])[..., feature.index].mean()), float(loss_metric(tokens)(logits))


@torch.no_grad()
def feature_ablation_sweep(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    feature: FeatureDirection,
    hook: str = "hook_post",
    method: str = "zero",
    seed: int = 0,
    neurons: Optional[NeuronsLike] = None,
    progress: bool = False,
    ablations_per_pass: Optional[int] = None,
) -> NeuronTable:
    """For each neuron of layer ``layer`` (``neurons``, default all): ``delta_feature``
    (mean activation of SAE feature ``feature.index`` over ``tokens``, ablated minus clean)
    and ``delta_loss``. ``method="mean"``/``"resample"`` take values from ``tokens``.
    ``ablations_per_pass`` neurons share one forward pass (default: about
    :data:`~bilinear_lens.activations.ablation.DEFAULT_TOKENS_PER_PASS` tokens per pass)."""
    check_tokens(tokens, d_vocab=model.cfg.d_vocab, min_pos=2)
    if not 0 <= feature.index < feature.sae.cfg.d_sae:
        raise ValueError(f"feature index {feature.index} out of range [0, {feature.sae.cfg.d_sae})")
    check_hook_names(model.hook_dict, [feature.sae.cfg.hook_name], where=type(model).__name__)
    hook_name = neuron_hook_name(model, layer, hook)
    indices = torch.arange(model.cfg.d_mlp) if neurons is None else neuron_indices(neurons, model.cfg.d_mlp)
    values = replacement(model, hook_name, method, None if method == "zero" else tokens, seed)
    per_pass = resolve_ablations_per_pass(ablations_per_pass, tokens)
    clean_feature, clean_loss = _feature_and_loss(model, tokens, feature)
    forward = copies_forward(model, tokens, layer, hook)
    loss = loss_metric(tokens)
    sae_hook, batch = feature.sae.cfg.hook_name, tokens.shape[0]
    deltas = torch.empty(indices.shape[0], 2, dtype=torch.float64)
    with progress_bar(total=indices.shape[0], desc=f"{method}-ablating {hook_name}", unit="neuron", enabled=progress) as bar:
        for start in range(0, indices.shape[0], per_pass):
            chunk = indices[start : start + per_pass]
            k = chunk.shape[0]
            seen: list[Tensor] = []
            with model.hooks(fwd_hooks=[(sae_hook, lambda act, hook: seen.append(act))]):
                logits = forward(chunk, values).view(k, batch, *tokens.shape[1:], -1)
            if seen:  # [k * batch, pos, d_in]: the copies, stacked along batch
                f = feature.sae.encode(seen[-1])[..., feature.index].reshape(k, -1).mean(-1).double().cpu()
            else:  # upstream of the ablation: not re-run, and unchanged
                f = torch.full((k,), clean_feature, dtype=torch.float64)
            losses = torch.stack([loss(copy).double().cpu() for copy in logits])
            deltas[start : start + k] = torch.stack([f - clean_feature, losses - clean_loss], dim=-1)
            bar.update(k)
    columns = {"neuron": indices, "delta_feature": deltas[:, 0], "delta_loss": deltas[:, 1]}
    return NeuronTable(layer, hook, method, columns, {"feature": clean_feature, "loss": clean_loss})
