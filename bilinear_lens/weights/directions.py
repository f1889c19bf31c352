"""Output directions in residual space, for reading a layer's contribution to the logits.

A direction ``u`` (``[d_model]``) turns the MLP output ``y`` into a scalar ``u . y``; for a
bilinear layer that scalar is the quadratic form ``x^T Q(u) x`` (:mod:`bilinear_lens.weights.tensor`).

**Final norm.** Logits are ``unembed(norm(resid))``. For a direction in *residual* space we
pull the unembedding column back through the norm's affine part:

- ``RMSPre`` / no norm: ``u = W_U[:, t]``;
- ``RMS`` (learned scale ``w``): ``u = w * W_U[:, t]``;
- ``LNPre``: ``u = W_U[:, t] - mean(W_U[:, t])`` (LayerNorm removes the mean, so only the
  centred part of the column can be reached);
- ``LN``: ``u = center(w * W_U[:, t])`` (the bias adds a constant per token, no direction).

The norm's per-token scale ``1 / rms(resid)`` is positive and shared by all logits of a
position, so it rescales but never reorders what ``u`` reads; it is left out.

**Deep layers.** A layer's output also flows through later layers; the directions here go
*straight* to the unembedding (the direct path), as Pearce et al. (2024) do when they
analyse an MLP's output for a token. Effects through later layers need hooks (ablation).
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.models.protocol import HookedModel

TokenLike = Union[int, str]


def token_id(model: HookedModel, token: TokenLike) -> int:
    """A token id from an id or a string that is exactly one token (e.g. ``" happy"``)."""
    d_vocab = model.cfg.d_vocab
    if isinstance(token, bool) or not isinstance(token, (int, str)):
        raise TypeError(f"token must be an int id or a one-token string, got {type(token).__name__}")
    if isinstance(token, int):
        if not 0 <= token < d_vocab:
            raise ValueError(f"token id {token} is out of range [0, {d_vocab})")
        return token
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"cannot look up token {token!r}: the model has no tokenizer; pass an id")
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ValueError(f"{token!r} is {len(ids)} tokens {pieces}, not one; pick a single token (mind the leading space)")
    return int(ids[0])


def _final_norm_affine(model: HookedModel) -> tuple[Float[Tensor, "d_model"] | None, bool]:
    """(learned scale or None, whether the norm centres) of the final norm."""
    kind = model.cfg.normalization_type
    weight = getattr(model.ln_final, "weight", None) if kind in ("RMS", "LN") else None
    return weight, kind in ("LN", "LNPre")


def residual_direction_for_logit(model: HookedModel, logit_vector: Float[Tensor, "d_model"]) -> Float[Tensor, "d_model"]:
    """Pull a vector that reads logits from the normalised stream (e.g. an unembedding
    column) back to residual space through the final norm (see module docstring)."""
    weight, centres = _final_norm_affine(model)
    u = logit_vector * weight if weight is not None else logit_vector
    return u - u.mean() if centres else u


def token_direction(model: HookedModel, token: TokenLike) -> Float[Tensor, "d_model"]:
    """Residual direction whose dot product with a layer's output is its direct effect on
    the logit of ``token``: the unembedding column through the final norm."""
    return residual_direction_for_logit(model, model.W_U[:, token_id(model, token)].detach())


def token_directions(model: HookedModel, tokens: Sequence[TokenLike] | None = None) -> Float[Tensor, "n d_model"]:
    """:func:`token_direction` for many tokens (all of the vocabulary by default)."""
    W_U = model.W_U.detach()
    cols = W_U if tokens is None else W_U[:, [token_id(model, t) for t in tokens]]
    weight, centres = _final_norm_affine(model)
    U = (cols * weight[:, None] if weight is not None else cols).T
    return U - U.mean(-1, keepdim=True) if centres else U


def logit_diff_direction(model: HookedModel, token_a: TokenLike, token_b: TokenLike) -> Float[Tensor, "d_model"]:
    """Direction reading ``logit[a] - logit[b]`` (e.g. ``" happy"`` vs ``" sad"``)."""
    return token_direction(model, token_a) - token_direction(model, token_b)


def vector_direction(model: HookedModel, vector: Tensor) -> Float[Tensor, "d_model"]:
    """An arbitrary residual-space vector, checked for shape and finiteness."""
    if not isinstance(vector, Tensor):
        vector = torch.as_tensor(vector)
    d_model = model.cfg.d_model
    if vector.shape != (d_model,):
        raise ValueError(f"direction must have shape ({d_model},) (d_model), got {tuple(vector.shape)}")
    if not torch.isfinite(vector).all():
        raise ValueError("direction contains NaN or inf")
    return vector.detach()


def feature_direction(decoder: Float[Tensor, "n_features d_model"], index: int) -> Float[Tensor, "d_model"]:
    """Row ``index`` of a feature dictionary's decoder (e.g. an SAE's ``W_dec``), as written
    into the residual stream: reading ``u . y`` then measures how much a layer writes
    along that feature (use :func:`residual_direction_for_logit` for features read after
    the final norm)."""
    if decoder.dim() != 2:
        raise ValueError(f"decoder must be [n_features, d_model], got shape {tuple(decoder.shape)}")
    if not 0 <= index < decoder.shape[0]:
        raise ValueError(f"feature index {index} out of range [0, {decoder.shape[0]})")
    return decoder[index].detach()


def resolve_direction(model: HookedModel, spec: Union[TokenLike, tuple[TokenLike, TokenLike], Tensor]) -> Float[Tensor, "d_model"]:
    """One entry point: a token (id or string) -> :func:`token_direction`; a pair
    ``(a, b)`` -> :func:`logit_diff_direction`; a tensor -> :func:`vector_direction`."""
    if isinstance(spec, Tensor):
        return vector_direction(model, spec)
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ValueError(f"a logit-difference direction needs two tokens, got {spec!r}")
        return logit_diff_direction(model, *spec)
    return token_direction(model, spec)
