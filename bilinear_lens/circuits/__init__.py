"""Circuits across the whole model: patching grids, attribution patching, exact pair
decompositions of bilinear MLPs over residual writers, attribution graphs without
transcoders, QK pair attributions and weight-based path interactions.

Exactness, stated once: a bilinear MLP ``f(x) = P((W x) * (V x))`` is homogeneous of degree
2, so ``f(x) = 1/2 J_f(x) x`` (Euler) and ``u . f(sum_c x_c) = sum_{c,d} x_c^T Q(u) x_d``.
With attention patterns and norm scales frozen at their values in the observed forward,
the whole model is then linear in the residual writers at that input, and attributions sum
exactly to the target. They are exact for the observed forward, not for counterfactuals
through the softmax or the norms; the symmetric split of a pair term is a convention, the
pair matrix itself is not.

Modules (inputs first, then what builds on them):

- ``prompts``: prompts to token ids: one prompt ``[1, pos]`` (``one_prompt_tokens``) and
  clean/corrupted batches of one length, no padding (``prompt_tokens``, ``prompt_pair_tokens``).
- ``writers``: the residual stream at a hook split into the components (or SAE features) that wrote it.
- ``freezing``: hooks holding attention patterns and norm scales at one forward's values.
- ``linearized``: the model made affine at one input (``freezing`` plus the symmetric bilinear MLP split).
- ``patch_nodes``: node families, what each cell of a patching grid patches.
- ``patching``: batched activation-patching grids (TransformerLens' ``get_act_patch_*``, all cells batched).
- ``attribution_patching``: attribution patching (atp, two-point, Gauss-Legendre, exact) with exactness diagnostics.
- ``pairs``: exact pair decomposition of a bilinear MLP's output over residual writers.
- ``qk_pairs``: a head's pre-softmax score split over (query writer, key writer) pairs.
- ``path_interactions``: weight-based path interactions of a bilinear MLP (no activations).
- ``graph``: attribution graphs without transcoders, exact direct effects in the linearized model.
- ``graph_prune``: influence-based pruning of an attribution graph.
- ``graph_export``: an attribution graph as Neuronpedia / circuit-tracer JSON.
"""
