"""TransformerLens' stacked weight attributes for :class:`BilinearTransformer`.

Shapes are TransformerLens' (``HookedTransformer`` / ``TransformerBridge``), so weight-based
code written for TransformerLens runs on our model unchanged::

    W_E [d_vocab, d_model]     W_U [d_model, d_vocab]     W_pos [n_ctx, d_model]
    W_Q, W_K, W_V [n_layers, n_heads, d_model, d_head]    W_O [n_layers, n_heads, d_head, d_model]
    b_Q, b_K, b_V [n_layers, n_heads, d_head]             b_O [n_layers, d_model]
    W_in, W_gate [n_layers, d_model, d_mlp]               W_out [n_layers, d_mlp, d_model]
    b_in, b_gate [n_layers, d_mlp]                        b_out [n_layers, d_model]

Stacked attributes are copies (``torch.stack``); the per-layer ones
(``model.blocks[l].attn.W_Q``, ``model.blocks[l].mlp.W_in``) are views. A weight the
config does not have (biases with ``*_bias=false``, ``W_gate`` of a plain MLP, MLP weights
of an attention-only model, ``W_pos`` with rotary positions) is ``None``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn


class AttentionWeightViews:
    """Per-layer TransformerLens views of ``q``/``k``/``v``/``o`` (``nn.Linear``, ``[out, in]``)."""

    n_heads: int
    d_head: int

    def _in_proj(self, name: str) -> Float[Tensor, "n_heads d_model d_head"]:
        weight = getattr(self, name).weight  # [n_heads * d_head, d_model]
        return weight.view(self.n_heads, self.d_head, -1).transpose(1, 2)

    def _in_bias(self, name: str) -> Optional[Float[Tensor, "n_heads d_head"]]:
        bias = getattr(self, name).bias
        return None if bias is None else bias.view(self.n_heads, self.d_head)

    @property
    def W_Q(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._in_proj("q")

    @property
    def W_K(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._in_proj("k")

    @property
    def W_V(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self._in_proj("v")

    @property
    def W_O(self) -> Float[Tensor, "n_heads d_head d_model"]:
        return getattr(self, "o").weight.T.reshape(self.n_heads, self.d_head, -1)

    @property
    def b_Q(self) -> Optional[Float[Tensor, "n_heads d_head"]]:
        return self._in_bias("q")

    @property
    def b_K(self) -> Optional[Float[Tensor, "n_heads d_head"]]:
        return self._in_bias("k")

    @property
    def b_V(self) -> Optional[Float[Tensor, "n_heads d_head"]]:
        return self._in_bias("v")

    @property
    def b_O(self) -> Optional[Float[Tensor, "d_model"]]:
        return getattr(self, "o").bias


def _stacked(blocks: nn.ModuleList, get: Callable[[nn.Module], Any]) -> Optional[Tensor]:
    """``torch.stack`` of ``get(block)`` over layers, or ``None`` where any layer lacks it."""
    parts = [get(block) for block in blocks]
    return None if any(p is None for p in parts) else torch.stack(parts)


def _attn(name: str) -> property:
    return property(lambda self: _stacked(self.blocks, lambda b: getattr(b.attn, name)), doc=f"``{name}`` stacked over layers.")


def _mlp(name: str) -> property:
    def get(block: nn.Module) -> Optional[Tensor]:
        mlp = getattr(block, "mlp", None)
        return None if mlp is None else getattr(mlp, name, None)

    return property(lambda self: _stacked(self.blocks, get), doc=f"``mlp.{name}`` stacked over layers.")


class StackedWeightViews:
    """Mixin: TransformerLens' model-level weight attributes (see the module docstring)."""

    blocks: nn.ModuleList
    W_Q, W_K, W_V, W_O = _attn("W_Q"), _attn("W_K"), _attn("W_V"), _attn("W_O")
    b_Q, b_K, b_V, b_O = _attn("b_Q"), _attn("b_K"), _attn("b_V"), _attn("b_O")
    W_in, W_gate, W_out = _mlp("W_in"), _mlp("W_gate"), _mlp("W_out")
    b_in, b_gate, b_out = _mlp("b_in"), _mlp("b_gate"), _mlp("b_out")
