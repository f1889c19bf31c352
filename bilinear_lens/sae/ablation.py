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

from bilinear_lens.activations.ablation import NeuronTable
from bilinear_lens.activations.ablation.neuron_hooks import NeuronsLike, neuron_hook_name, neuron_indices
from bilinear_lens.activations.ablation.sweep import cluster_labels, copies_forward, resolve_ablations_per_pass
from bilinear_lens.activations.ablation.uncertainty import Clusters, uncertainty_columns, uncertainty_record
from bilinear_lens.activations.ablation.values import check_tokens, replacement
from bilinear_lens.activations.capture import run_capturing
from bilinear_lens.models.hook_names import check_hook_names
from bilinear_lens.models.model import next_token_loss
from bilinear_lens.weights.directions import FeatureDirection
from bilinear_lens.progress import progress_bar


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
    documents: Optional[Int[Tensor, "batch pos"]] = None,
) -> NeuronTable:
    """For each neuron of layer ``layer`` (``neurons``, default all): ``delta_feature``
    (mean activation of SAE feature ``feature.index`` over ``tokens``, ablated minus clean)
    and ``delta_loss``, each with ``_se`` / ``_p`` / ``_q`` columns as
    :func:`~bilinear_lens.activations.ablation.ablation_sweep` gives (standard errors
    clustered by ``documents``, default one cluster per row; Benjamini-Hochberg over the
    swept neurons). ``method="mean"``/``"resample"`` take values from ``tokens``.
    ``ablations_per_pass`` neurons share one forward pass (default: about
    :data:`~bilinear_lens.activations.ablation.DEFAULT_TOKENS_PER_PASS` tokens per pass)."""
    check_tokens(tokens, d_vocab=model.cfg.d_vocab, min_pos=2)
    labels = cluster_labels(tokens, documents)
    if not 0 <= feature.index < feature.sae.cfg.d_sae:
        raise ValueError(f"feature index {feature.index} out of range [0, {feature.sae.cfg.d_sae})")
    check_hook_names(model.hook_dict, [feature.sae.cfg.hook_name], where=type(model).__name__)
    hook_name = neuron_hook_name(model, layer, hook)
    indices = torch.arange(model.cfg.d_mlp) if neurons is None else neuron_indices(neurons, model.cfg.d_mlp)
    values = replacement(model, hook_name, method, None if method == "zero" else tokens, seed)
    per_pass = resolve_ablations_per_pass(ablations_per_pass, tokens)
    clusters = {"feature": Clusters.of(labels), "loss": Clusters.of(labels[:, 1:])}  # a loss: the token predicted
    clean_f, clean_nll = _clean_values(model, tokens, feature)
    clean_feature, clean_loss = float(clean_f.double().mean()), float(clean_nll.double().mean())
    clean_sums = {"feature": clusters["feature"].sums(clean_f), "loss": clusters["loss"].sums(clean_nll)}
    forward = copies_forward(model, tokens, layer, hook)
    sae_hook, batch = feature.sae.cfg.hook_name, tokens.shape[0]
    sums = {name: torch.empty(indices.shape[0], c.n_clusters, dtype=torch.float64) for name, c in clusters.items()}
    with progress_bar(total=indices.shape[0], desc=f"{method}-ablating {hook_name}", unit="neuron", enabled=progress) as bar:
        for start in range(0, indices.shape[0], per_pass):
            chunk = indices[start : start + per_pass]
            k = chunk.shape[0]
            seen: list[Tensor] = []
            with model.hooks(fwd_hooks=[(sae_hook, lambda act, hook: seen.append(act))]):
                logits = forward(chunk, values).view(k, batch, *tokens.shape[1:], -1)
            # [k, batch, pos]: the copies' feature activations (upstream of the ablation: clean, not re-run)
            f = (feature.sae.encode(seen[-1])[..., feature.index].reshape(k, *tokens.shape) if seen
                 else clean_f[None].expand(k, *tokens.shape))
            for j, copy in enumerate(logits):
                per_token = {"feature": f[j], "loss": next_token_loss(copy, tokens.to(copy.device), per_token=True)}
                for name, v in per_token.items():
                    sums[name][start + j] = clusters[name].sums(v)
            bar.update(k)
    delta_sums = {name: s - clean_sums[name] for name, s in sums.items()}
    # each mean effect is its cluster sums' total over the values counted
    columns = {"neuron": indices,
               **{f"delta_{name}": d.sum(-1) / clusters[name].sizes.sum() for name, d in delta_sums.items()}}
    columns.update(uncertainty_columns(columns, delta_sums, clusters))
    return NeuronTable(layer, hook, method, columns, {"feature": clean_feature, "loss": clean_loss},
                       uncertainty_record(documents, clusters))


def _clean_values(model: Any, tokens: Tensor, feature: FeatureDirection) -> tuple[Tensor, Tensor]:
    """The clean run's feature activation at each token ``[batch, pos]`` and loss of each
    predicted token ``[batch, pos - 1]``."""
    hook = feature.sae.cfg.hook_name
    logits, acts = run_capturing(model, tokens, [hook], return_type="logits")
    return (feature.sae.encode(acts[hook])[..., feature.index],
            next_token_loss(logits, tokens.to(logits.device), per_token=True))
