"""The model contract of the analysis code: what it may call on a model.

Hook-based analysis (:mod:`bilinear_lens.activations`, :mod:`bilinear_lens.views`) and
direction helpers (:mod:`bilinear_lens.weights.directions`) use only the members below, so
they run on :class:`~bilinear_lens.models.model.BilinearTransformer` and on its
TransformerLens ``TransformerBridge`` (:func:`~bilinear_lens.models.bridge.to_bridge`)
alike. TransformerLens 4.3's ``model_protocol.TransformerLensModel`` states the same idea
for its own utilities but types ``cfg`` as ``TransformerLensConfig`` and leaves out the
hook table, which our :class:`~bilinear_lens.models.config.ModelConfig` models are not and
which every hook check reads; this Protocol is ours.
"""

from __future__ import annotations

from typing import Any, ContextManager, Mapping, Protocol, runtime_checkable


@runtime_checkable
class HookedModel(Protocol):
    """A TransformerLens-style model with TransformerLens hook names.

    - ``cfg``: ``n_layers``, ``d_model``, ``d_mlp``, ``d_vocab`` and the MLP kind
      (``mlp_kind``, or ``bilinear_lens_mlp_kind`` on a bridge config);
    - ``hook_dict``: hook name -> hook point (``blocks.{l}.mlp.hook_post``, ...);
    - ``blocks[l].mlp``: the MLP, with ``W_in``/``W_gate``/``W_out`` in TransformerLens
      orientation (weight-based readings);
    - ``hooks(fwd_hooks=...)``: a context manager installing ``(name, fn)`` hooks;
    - ``run_with_hooks(tokens, fwd_hooks=..., return_type=...)``,
      ``run_with_cache(tokens, names_filter=...)`` and ``model(tokens)`` (logits
      ``[batch, pos, d_vocab]``);
    - ``W_E`` ``[d_vocab, d_model]``, ``W_U`` ``[d_model, d_vocab]`` and ``ln_final``
      (token directions through the final norm);
    - ``tokenizer`` and ``to_tokens`` where strings name tokens.
    """

    @property
    def cfg(self) -> Any: ...

    @property
    def hook_dict(self) -> Mapping[str, Any]: ...

    @property
    def blocks(self) -> Any: ...

    @property
    def ln_final(self) -> Any: ...

    @property
    def W_E(self) -> Any: ...

    @property
    def W_U(self) -> Any: ...

    @property
    def tokenizer(self) -> Any: ...

    def hooks(self, *args: Any, **kwargs: Any) -> ContextManager[Any]: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any: ...

    def to_tokens(self, *args: Any, **kwargs: Any) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
