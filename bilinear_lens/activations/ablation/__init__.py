"""Hook-based ablation and activation patching: neurons, residual directions, eigen-components.

Every intervention is a TransformerLens forward hook. A ``*_hook(s)`` factory returns
``(hook_name, fn)`` pairs for ``model.run_with_hooks(tokens, fwd_hooks=[...])``; the
``ablate_*`` context manager of the same intervention installs them with ``model.hooks``::

    with ablate_neurons(model, layer=0, neurons=[3, 17], method="mean", reference=tokens):
        loss = model(tokens, return_type="loss")

Models are typed :class:`~bilinear_lens.models.protocol.HookedModel`: only ``hook_dict``,
``hooks``, ``run_with_hooks``, ``cfg``, ``blocks`` and forward calls are used, so everything
runs on :class:`~bilinear_lens.models.model.BilinearTransformer` and on its TransformerLens
``TransformerBridge`` (:func:`~bilinear_lens.models.bridge.to_bridge`) alike.

Modules, one job each:

- :mod:`.values`: replacement values (``"zero"``, ``"mean"``, ``"resample"``, ``"patch"``);
- :mod:`.neuron_hooks`, :mod:`.direction_hooks`, :mod:`.eigen_hooks`: the three hook
  families and their context managers (:mod:`.install`);
- :mod:`.metrics`: ``logits -> scalar`` metrics;
- :mod:`.table`: :class:`NeuronTable`, the result of a sweep;
- :mod:`.sweep`: batched single-neuron sweeps (:func:`ablation_sweep`, :func:`patch_neurons`),
  restarting copies inside the ablated MLP on our model.
"""

from __future__ import annotations

from bilinear_lens.activations.ablation.direction_hooks import ablate_direction, direction_ablation_hook
from bilinear_lens.activations.ablation.eigen_hooks import MLP_OUT_HOOKS, ablate_eigencomponents, eigen_ablation_hooks
from bilinear_lens.activations.ablation.metrics import logit_diff_metric, logit_metric, loss_metric
from bilinear_lens.activations.ablation.neuron_hooks import NEURON_HOOKS, ablate_neurons, neuron_ablation_hook
from bilinear_lens.activations.ablation.sweep import DEFAULT_TOKENS_PER_PASS, ablation_sweep, patch_neurons
from bilinear_lens.activations.ablation.table import NeuronTable
from bilinear_lens.activations.ablation.values import METHODS

__all__ = [
    "DEFAULT_TOKENS_PER_PASS",
    "METHODS",
    "MLP_OUT_HOOKS",
    "NEURON_HOOKS",
    "NeuronTable",
    "ablate_direction",
    "ablate_eigencomponents",
    "ablate_neurons",
    "ablation_sweep",
    "direction_ablation_hook",
    "eigen_ablation_hooks",
    "logit_diff_metric",
    "logit_metric",
    "loss_metric",
    "neuron_ablation_hook",
    "patch_neurons",
]
