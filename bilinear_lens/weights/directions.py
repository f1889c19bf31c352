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

**SAE features** (:class:`FeatureDirection`): an SAE trained on a residual-stream hook
(``hook_resid_pre/mid/post``, ``hook_attn_out``, ``hook_mlp_out``) lives in the residual
basis, so its decoder row is used *directly* as ``u``: ``u . y`` is how much the layer writes
along the feature. An SAE on ``ln_final.hook_normalized`` reads the *normalised* stream
that feeds the logits, so its row is pulled back through the final norm exactly as an
unembedding column is (:func:`residual_direction_for_logit`). SAEs on other hooks (inside
an MLP, attention heads) have no residual direction and are refused.

**Deep layers.** A layer's output also flows through later layers; the directions here go
*straight* to the unembedding (the direct path), as Pearce et al. (2024) do when they
analyse an MLP's output for a token. Effects through later layers need hooks (ablation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.models.protocol import HookedModel
from bilinear_lens.weights.tensor import check_finite

TokenLike = Union[int, str]
RESIDUAL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
FINAL_NORM_HOOK = "ln_final.hook_normalized"
FEATURE_READS = ("decoder", "encoder")


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
    try:  # a command-line argument with invalid UTF-8 arrives with lone surrogates
        token.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(err.object[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise ValueError(f"token {token!r} is not valid UTF-8 text ({what} at character {err.start}); "
                         "give the token as UTF-8 text or by id") from None
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
    """Direction reading ``logit[a] - logit[b]`` (e.g. ``" happy"`` vs ``" sad"``); the same
    token twice gives the zero vector, which reads nothing: refused."""
    if token_id(model, token_a) == token_id(model, token_b):
        raise ValueError(f"logit difference of {token_a!r} and {token_b!r}: the same token, a zero direction")
    return token_direction(model, token_a) - token_direction(model, token_b)


def vector_direction(model: HookedModel, vector: Tensor) -> Float[Tensor, "d_model"]:
    """An arbitrary residual-space vector, checked for shape and finiteness."""
    if not isinstance(vector, Tensor):
        vector = torch.as_tensor(vector)
    d_model = model.cfg.d_model
    if vector.shape != (d_model,):
        raise ValueError(f"direction must have shape ({d_model},) (d_model), got {tuple(vector.shape)}")
    check_finite(vector, "direction")
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


def is_residual_hook(hook_name: str) -> bool:
    """Whether ``hook_name`` is ``blocks.{l}.<one of RESIDUAL_HOOKS>`` (the residual basis)."""
    parts = hook_name.split(".")
    return len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in RESIDUAL_HOOKS


@dataclass(frozen=True)
class FeatureDirection:
    """Feature ``index`` of an SAE (:class:`~bilinear_lens.sae.model.SAE`, anything with
    ``cfg.hook_name``, ``cfg.d_in``, ``W_dec [d_sae, d_in]`` and ``W_enc [d_in, d_sae]``)
    as an output direction.

    ``read="decoder"`` (default): ``u = W_dec[index]``, the direction the feature writes;
    ``"encoder"``: ``u = W_enc[:, index]``, so ``u . y`` is the layer's contribution to the
    feature's pre-activation. Either is used directly or through the final norm depending
    on the SAE's hook (module docstring).
    """

    sae: Any
    index: int
    read: str = "decoder"

    @property
    def label(self) -> str:
        return f"feature {self.index} of the SAE on {self.sae.cfg.hook_name}"


def sae_feature_direction(model: HookedModel, feature: FeatureDirection) -> Float[Tensor, "d_model"]:
    """The residual direction ``u`` of an SAE feature (see :class:`FeatureDirection`)."""
    cfg = feature.sae.cfg
    if feature.read not in FEATURE_READS:
        raise ValueError(f"FeatureDirection.read={feature.read!r}; allowed: {list(FEATURE_READS)}")
    if isinstance(feature.index, bool) or not isinstance(feature.index, int):
        raise ValueError(f"feature index must be an int, got {feature.index!r}")
    if cfg.d_in != model.cfg.d_model:
        raise ValueError(f"the SAE on {cfg.hook_name} has d_in={cfg.d_in}, but the model's d_model is {model.cfg.d_model}")
    rows = feature.sae.W_dec if feature.read == "decoder" else feature.sae.W_enc.T
    row = feature_direction(rows, feature.index)
    if cfg.hook_name == FINAL_NORM_HOOK:
        return residual_direction_for_logit(model, row)
    if not is_residual_hook(cfg.hook_name):
        raise ValueError(
            f"the SAE on {cfg.hook_name!r} has no residual-stream direction; feature directions need an SAE on "
            f"blocks.{{l}}.{{{','.join(RESIDUAL_HOOKS)}}} or {FINAL_NORM_HOOK}"
        )
    return row


DirectionLike = Union[TokenLike, tuple[TokenLike, TokenLike], Tensor, FeatureDirection]


def resolve_direction(model: HookedModel, spec: DirectionLike) -> Float[Tensor, "d_model"]:
    """One entry point: a token (id or string) -> :func:`token_direction`; a pair
    ``(a, b)`` -> :func:`logit_diff_direction`; a tensor -> :func:`vector_direction`; a
    :class:`FeatureDirection` -> :func:`sae_feature_direction`. A zero direction (e.g. the
    logit difference of a token with itself) reads nothing and is refused."""
    if isinstance(spec, FeatureDirection):
        u = sae_feature_direction(model, spec)
    elif isinstance(spec, Tensor):
        u = vector_direction(model, spec)
    elif isinstance(spec, tuple):
        if len(spec) != 2:
            raise ValueError(f"a logit-difference direction needs two tokens, got {spec!r}")
        u = logit_diff_direction(model, *spec)
    else:
        u = token_direction(model, spec)
    if not bool(u.any()):
        what = spec.label if isinstance(spec, FeatureDirection) else "the given vector" if isinstance(spec, Tensor) else repr(spec)
        raise ValueError(f"the direction of {what} is zero: it reads nothing")
    return u
