"""Neuron ablation measured on an SAE feature: which MLP neurons drive a feature.

:func:`~bilinear_lens.activations.ablation.ablation_sweep` ranks neurons by metrics of the
logits; an SAE feature is read at its own hook, so this sweep runs one hooked forward per
neuron (with :func:`~bilinear_lens.activations.ablation.ablate_neurons`) and reads the
feature's activation ``f_i(x)`` (:meth:`~bilinear_lens.sae.model.SAE.encode`) at the SAE's
hook, averaged over all tokens, next to the mean next-token loss.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from bilinear_lens.activations.ablation import NeuronTable, ablate_neurons, loss_metric
from bilinear_lens.models.hook_names import check_hook_names
from bilinear_lens.weights.directions import FeatureDirection


def _feature_and_loss(model: Any, tokens: Tensor, feature: FeatureDirection) -> tuple[float, float]:
    hook = feature.sae.cfg.hook_name
    logits, cache = model.run_with_cache(tokens, names_filter=[hook])
    acts = feature.sae.encode(cache[hook])[..., feature.index]
    return float(acts.mean()), float(loss_metric(tokens)(logits))


@torch.no_grad()
def feature_ablation_sweep(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    feature: FeatureDirection,
    hook: str = "hook_post",
    method: str = "zero",
    seed: int = 0,
    neurons: Optional[list[int]] = None,
    progress: bool = False,
) -> NeuronTable:
    """For each neuron of layer ``layer`` (``neurons``, default all): ``delta_feature``
    (mean activation of SAE feature ``feature.index`` over ``tokens``, ablated minus clean)
    and ``delta_loss``. ``method="mean"``/``"resample"`` take values from ``tokens``."""
    if not 0 <= feature.index < feature.sae.cfg.d_sae:
        raise ValueError(f"feature index {feature.index} out of range [0, {feature.sae.cfg.d_sae})")
    check_hook_names(model.hook_dict, [feature.sae.cfg.hook_name], where=type(model).__name__)
    indices = list(range(model.cfg.d_mlp)) if neurons is None else list(neurons)
    clean_feature, clean_loss = _feature_and_loss(model, tokens, feature)
    deltas = torch.empty(len(indices), 2, dtype=torch.float64)
    reference = None if method == "zero" else tokens
    for row, neuron in enumerate(tqdm(indices, desc="ablating", disable=not progress)):
        with ablate_neurons(model, layer, [neuron], hook=hook, method=method, reference=reference, seed=seed):
            value, loss = _feature_and_loss(model, tokens, feature)
        deltas[row] = torch.tensor([value - clean_feature, loss - clean_loss])
    columns = {"neuron": torch.tensor(indices), "delta_feature": deltas[:, 0], "delta_loss": deltas[:, 1]}
    return NeuronTable(layer, hook, method, columns, {"feature": clean_feature, "loss": clean_loss})
