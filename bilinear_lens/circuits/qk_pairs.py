"""QK pair attribution: a head's pre-softmax score split over (query writer, key writer) pairs.

Head ``h`` of layer ``l`` scores query position ``p`` against key position ``s`` as

    score(p, s) = (R_p (W_Q^T x_p + b_Q)) . (R_s (W_K^T x_s + b_K)) / sqrt(d_head)

with ``x = ln1(hook_resid_pre)`` and ``R_p`` rotary's rotation at position ``p`` (a fixed
linear map per position; identity for learned positions). With ln1's scale frozen at its
observed value, ``x_p = sum_c x_c(p)`` over the residual writers
(:mod:`bilinear_lens.circuits.writers`, ``ln1 bias`` as its own writer for LayerNorm), and
``b_Q``/``b_K`` are one more writer per side, so

    score(p, s) = sum_{c, d} T[c, d],   T[c, d] = (R_p W_Q^T x_c(p)) . (R_s W_K^T x_d(s)) / sqrt(d_head)

exactly: a bilinear form, not a symmetric one (query and key writers are different pieces
of the stream). Exact for the observed forward with ln1's scale frozen, not for
counterfactuals through the norm or the softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.circuits.pairs import frozen_norm_inputs
from bilinear_lens.circuits.prompts import TokensLike, one_prompt_tokens
from bilinear_lens.circuits.writers import resolve_positions, writer_hook_names, writers_from_cache
from bilinear_lens.models.hook_names import check_layer


@dataclass
class QKPairs:
    """``matrix[c, d]``: query writer ``query_labels[c]`` at ``query_position`` times key
    writer ``key_labels[d]`` at ``key_position``, for head ``head`` of ``layer``; sums to the
    pre-softmax score (``observed``: the hooked ``hook_attn_scores``, ``None`` on a model
    without pre-softmax scores, e.g. the bridge). ``scales``: ln1's frozen scales at the
    query and key positions (``None`` without a norm)."""

    layer: int
    head: int
    query_position: int
    key_position: int
    query_labels: list[str]
    key_labels: list[str]
    matrix: Float[Tensor, "n_query n_key"]
    scales: Optional[tuple[float, float]]
    observed: Optional[float]

    @property
    def total(self) -> float:
        return float(self.matrix.sum())

    def pair_wise_contributors(self, k: Optional[int] = None) -> list[tuple[str, str, float]]:
        """``(query writer, key writer, value)`` triples, largest ``|value|`` first (the ``k``
        largest; all by default). The values of all triples sum to :attr:`total`."""
        flat = self.matrix.flatten()
        order = flat.abs().argsort(descending=True)[: (None if k is None else k)]
        n_key = self.matrix.shape[1]
        return [(self.query_labels[int(i) // n_key], self.key_labels[int(i) % n_key], float(flat[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "head": self.head, "query_position": self.query_position,
                "key_position": self.key_position, "query_labels": self.query_labels,
                "key_labels": self.key_labels, "matrix": self.matrix.tolist(), "total": self.total,
                "observed": self.observed, "scales": self.scales,
                "pair_wise_contributors": [list(t) for t in self.pair_wise_contributors(20)]}


def _attention_module(model: Any, layer: int) -> Any:
    attn = model.blocks[layer].attn
    return getattr(attn, "original_component", attn)  # the bridge wraps our module


def rotate(attn: Any, vectors: Float[Tensor, "n d_head"], position: int) -> Float[Tensor, "n d_head"]:
    """Rotary's rotation at ``position`` applied to each row (the model's own tables, so the
    result matches its forward bit for bit); unchanged without rotary."""
    rotary = getattr(attn, "rotary", None)
    if rotary is None:
        return vectors
    ids = torch.full((1, vectors.shape[0]), position, dtype=torch.long, device=vectors.device)
    return rotary(vectors[None, :, None, :], ids)[0, :, 0, :]


@torch.no_grad()
def qk_pair_attribution(
    model: Any,
    tokens: TokensLike,
    layer: int,
    head: int,
    query_position: int = -1,
    key_position: Optional[int] = None,
) -> QKPairs:
    """Split head ``head`` of layer ``layer``'s pre-softmax score at (``query_position``,
    ``key_position``) over query-side x key-side residual writers (module docstring).
    ``key_position=None``: the key the head attends to most from the query. A key after the
    query (masked by causal attention) is refused."""
    check_layer(model, layer)
    n_heads = model.cfg.n_heads
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < n_heads:
        raise ValueError(f"head={head!r} is out of range [0, {n_heads})")
    tokens = one_prompt_tokens(model, tokens)
    n_pos = tokens.shape[1]
    (p,) = resolve_positions(query_position, n_pos, "query_position")
    hook = f"blocks.{layer}.hook_resid_pre"
    norm_kind = model.cfg.normalization_type
    names = writer_hook_names(model, layer, "pre") + [hook, f"blocks.{layer}.attn.hook_pattern"]
    if norm_kind is not None:
        names.append(f"blocks.{layer}.ln1.hook_scale")
    # our model's hook_attn_scores are pre-softmax; the bridge (whose components wrap ours) fires the pattern there
    our_scores = not hasattr(model.blocks[layer].attn, "original_component")
    if our_scores:
        names.append(f"blocks.{layer}.attn.hook_attn_scores")
    _, cache = model.run_with_cache(tokens, names_filter=sorted(set(names)))
    if key_position is None:
        s = int(cache[f"blocks.{layer}.attn.hook_pattern"][0, head, p].argmax())
    else:
        (s,) = resolve_positions(key_position, n_pos, "key_position")
        if s > p:
            raise ValueError(f"key_position={key_position!r} is after query_position={p}: causal attention masks it")
    writers = writers_from_cache(model, cache, hook, [p, s], tokens)
    attn = _attention_module(model, layer)
    sides, scales = [], []
    for i, (position, W, b, name) in enumerate(((p, attn.W_Q, attn.b_Q, "q"), (s, attn.W_K, attn.b_K, "k"))):
        vectors = writers.vectors[:, i]
        labels = list(writers.labels)
        if norm_kind is not None:
            scale = cache[f"blocks.{layer}.ln1.hook_scale"][0, position]
            scales.append(float(scale))
            vectors, ln_bias = frozen_norm_inputs(model, layer, vectors, scale, "ln1")
            if ln_bias is not None:
                vectors = torch.cat([vectors, ln_bias[None]])
                labels.append("ln1 bias")
        projected = vectors @ W[head].detach().to(vectors.dtype)  # [n, d_head]
        if b is not None:
            projected = torch.cat([projected, b[head].detach().to(vectors.dtype)[None]])
            labels.append(f"{name} bias")
        sides.append((labels, rotate(attn, projected, position)))
    (q_labels, q), (k_labels, k) = sides
    matrix = q @ k.T / math.sqrt(model.cfg.d_head)
    observed = float(cache[f"blocks.{layer}.attn.hook_attn_scores"][0, head, p, s]) if our_scores else None
    return QKPairs(layer, head, p, s, q_labels, k_labels, matrix,
                   (scales[0], scales[1]) if scales else None, observed)
