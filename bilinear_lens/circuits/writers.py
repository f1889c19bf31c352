"""The residual stream at a hook, split into the components that wrote it.

In a pre-norm transformer the residual entering a block is a plain sum of what the
embedding and every earlier component wrote::

    resid(blocks.{l}.hook_resid_pre)  = embed (+ pos_embed)
                                        + sum_{l' < l} [ sum_h z_{l'}[., h] @ W_O[l', h] + mlp_out_{l'} ]
                                        + bias  (every b_O and b_out of those layers)
    hook_resid_mid = hook_resid_pre + layer l's heads (+ its b_O)
    hook_resid_post = hook_resid_mid + layer l's MLP (+ its b_out)

:func:`residual_writers` returns these writers at chosen positions, read from one forward
pass's hooks (``hook_embed``, ``hook_pos_embed``, ``blocks.{l}.attn.hook_z``,
``blocks.{l}.hook_mlp_out``) and the weights ``W_O``, ``b_O``, ``b_out``; they sum to the
cached residual up to float rounding (a head writer is ``z[p, h] @ W_O[h]``, an MLP writer
``hook_mlp_out - b_out``, so every bias sits in the one ``bias`` writer).

:func:`sae_writers` uses a custom basis instead: an SAE on the residual hook (or on the
layer's MLP input) writes ``a_i(p) W_dec[i]`` per feature, ``b_dec``, and an explicit
``error`` writer ``x - x_hat``, so the basis is exact by construction.

Both work on our model and on ``to_bridge(model)`` (the hooks above are the same there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from bilinear_lens.circuits.prompts import TokensLike, one_prompt_tokens

RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")
WRITER_KINDS = ("embed", "pos_embed", "head", "mlp", "bias", "sae_feature", "sae_bias", "sae_error")


@dataclass
class ResidualWriters:
    """Writers of the activation at ``hook`` at ``positions``.

    ``vectors[c, i]`` is writer ``c``'s contribution at ``positions[i]`` (``[n_writers,
    n_positions, d_model]``); ``vectors.sum(0)`` equals ``activation`` (the cached value,
    ``[n_positions, d_model]``). ``labels``/``kinds`` name each writer (``kinds`` from
    :data:`WRITER_KINDS`). ``space`` is ``"residual"`` (a residual hook: the MLP's norm still
    applies) or ``"mlp_input"`` (an SAE basis on ``blocks.{l}.mlp.hook_in`` or
    ``ln2.hook_normalized``: already the MLP's input). ``tokens`` are the prompt's ids.
    """

    hook: str
    positions: list[int]
    labels: list[str]
    kinds: list[str]
    vectors: Float[Tensor, "n_writers n_positions d_model"]
    activation: Float[Tensor, "n_positions d_model"]
    tokens: Tensor
    space: str = "residual"
    layer: Optional[int] = None  # for an "mlp_input" basis: whose MLP
    extra: dict = field(default_factory=dict)

    def total(self) -> Float[Tensor, "n_positions d_model"]:
        """Sum over writers: the reconstructed activation."""
        return self.vectors.sum(0)

    def __len__(self) -> int:
        return len(self.labels)


def resolve_positions(positions: Union[int, Sequence[int], None], n_pos: int, name: str = "position") -> list[int]:
    """Positions as non-negative indices (negative ones count from the end; ``None``: the
    last); out of range is a one-line ``ValueError`` naming ``name`` and the value."""
    if positions is None:
        positions = [-1]
    single = isinstance(positions, int) and not isinstance(positions, bool)
    values = [positions] if single else list(positions)  # type: ignore[arg-type]
    if not values:
        raise ValueError(f"{name} must name at least one position, got {positions!r}")
    out = []
    for p in values:
        if isinstance(p, bool) or not isinstance(p, int) or not -n_pos <= p < n_pos:
            raise ValueError(f"{name}={p!r} is out of range for a prompt of {n_pos} tokens ([-{n_pos}, {n_pos}))")
        out.append(p % n_pos)
    return out


def parse_resid_hook(model: Any, hook: str) -> tuple[int, str]:
    """``(layer, "pre" | "mid" | "post")`` of ``blocks.{l}.hook_resid_{pre,mid,post}``."""
    match = RESID_HOOK.match(hook) if isinstance(hook, str) else None
    if match is None or not int(match.group(1)) < model.cfg.n_layers:
        raise ValueError(
            f"hook={hook!r} is not a residual hook of this model: use blocks.{{l}}.hook_resid_pre/mid/post "
            f"with l in [0, {model.cfg.n_layers})"
        )
    layer, where = int(match.group(1)), match.group(2)
    if hook not in model.hook_dict:
        raise ValueError(f"hook={hook!r}: this model has no such hook (an attention-only block has no hook_resid_mid)")
    return layer, where


def _has_mlp(model: Any, layer: int) -> bool:
    return getattr(model.blocks[layer], "mlp", None) is not None and f"blocks.{layer}.hook_mlp_out" in model.hook_dict


def writer_hook_names(model: Any, layer: int, where: str) -> list[str]:
    """Hooks :func:`residual_writers` reads for ``blocks.{layer}.hook_resid_{where}``."""
    names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_dict else [])
    for l in range(layer + (0 if where == "pre" else 1)):
        names.append(f"blocks.{l}.attn.hook_z")
        if _has_mlp(model, l) and (l < layer or where == "post"):
            names.append(f"blocks.{l}.hook_mlp_out")
    return names


@torch.no_grad()
def writers_from_cache(
    model: Any, cache: Any, hook: str, positions: Sequence[int], tokens: Tensor
) -> ResidualWriters:
    """:func:`residual_writers` from an existing cache (``cache[name]`` is ``[1, pos, ...]``)
    holding :func:`writer_hook_names` and ``hook``; ``positions`` already resolved."""
    layer, where = parse_resid_hook(model, hook)
    pos = list(positions)
    labels, kinds, vectors = ["embed"], ["embed"], [cache["hook_embed"][0, pos]]
    if "hook_pos_embed" in model.hook_dict:
        labels.append("pos_embed"), kinds.append("pos_embed"), vectors.append(cache["hook_pos_embed"][0, pos])
    bias = torch.zeros_like(vectors[0])
    for l in range(layer + (0 if where == "pre" else 1)):
        attn = model.blocks[l].attn
        z = cache[f"blocks.{l}.attn.hook_z"][0, pos]  # [n_pos, n_heads, d_head]
        W_O = attn.W_O.detach().to(z.dtype)  # [n_heads, d_head, d_model]
        heads = torch.einsum("phd,hdm->hpm", z, W_O)
        for h in range(heads.shape[0]):
            labels.append(f"L{l}H{h}"), kinds.append("head"), vectors.append(heads[h])
        if attn.b_O is not None:
            bias = bias + attn.b_O.detach().to(bias.dtype)
        if _has_mlp(model, l) and (l < layer or where == "post"):
            out = cache[f"blocks.{l}.hook_mlp_out"][0, pos]
            b_out = getattr(model.blocks[l].mlp, "b_out", None)
            if b_out is not None:
                out = out - b_out.detach().to(out.dtype)
                bias = bias + b_out.detach().to(bias.dtype)
            labels.append(f"MLP{l}"), kinds.append("mlp"), vectors.append(out)
    if bool(bias.any()):
        labels.append("bias"), kinds.append("bias"), vectors.append(bias)
    return ResidualWriters(hook, pos, labels, kinds, torch.stack(vectors), cache[hook][0, pos], tokens[0].clone())


@torch.no_grad()
def residual_writers(
    model: Any, tokens: TokensLike, hook: str, positions: Union[int, Sequence[int], None] = None
) -> ResidualWriters:
    """The writers of residual ``hook`` (``blocks.{l}.hook_resid_pre/mid/post``) at
    ``positions`` (default: the last) of one prompt: ``embed``, ``pos_embed`` (learned
    positions only), every head ``L{l}H{h}`` and MLP ``MLP{l}`` written before the hook, and
    one ``bias`` writer (all ``b_O``/``b_out`` so far; left out when zero). Their sum is the
    cached ``hook`` activation (module docstring). Works on our model and on
    ``to_bridge(model)``."""
    layer, where = parse_resid_hook(model, hook)
    tokens = one_prompt_tokens(model, tokens)
    pos = resolve_positions(positions, tokens.shape[1], "positions")
    names = writer_hook_names(model, layer, where) + [hook]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    return writers_from_cache(model, cache, hook, pos, tokens)


SAE_INPUT_HOOKS = ("mlp.hook_in", "ln2.hook_normalized")


def sae_basis_space(model: Any, sae: Any) -> tuple[str, int]:
    """``("residual", layer)`` for an SAE on ``blocks.{l}.hook_resid_*``, ``("mlp_input", l)``
    for one on ``blocks.{l}.mlp.hook_in`` / ``ln2.hook_normalized``; a width other than
    ``d_model`` or another hook is a one-line ``ValueError`` naming the SAE field."""
    cfg = sae.cfg
    if cfg.d_in != model.cfg.d_model:
        raise ValueError(f"sae.cfg.d_in={cfg.d_in} does not match the model's d_model={model.cfg.d_model} (SAE on {cfg.hook_name})")
    match = RESID_HOOK.match(cfg.hook_name)
    if match:
        return "residual", int(match.group(1))
    input_hook = re.match(r"^blocks\.(\d+)\.(mlp\.hook_in|ln2\.hook_normalized)$", cfg.hook_name)
    if input_hook and int(input_hook.group(1)) < model.cfg.n_layers:
        return "mlp_input", int(input_hook.group(1))
    raise ValueError(
        f"sae.cfg.hook_name={cfg.hook_name!r} is not a basis for the residual stream: use an SAE on "
        "blocks.{l}.hook_resid_pre/mid/post or blocks.{l}.mlp.hook_in"
    )


@torch.no_grad()
def sae_writers(
    model: Any,
    tokens: TokensLike,
    sae: Any,
    positions: Union[int, Sequence[int], None] = None,
    features: Optional[Sequence[int]] = None,
    include_error: bool = True,
    unit_activations: bool = False,
) -> ResidualWriters:
    """The activation at ``sae.cfg.hook_name`` at ``positions`` in the SAE's basis: one writer
    ``feature {i}`` per feature (``a_i(p) W_dec[i]``; by default the features active at any of
    the positions, else ``features``), ``sae b_dec``, and ``sae error`` (``x - x_hat``, so the
    writers sum to ``x`` exactly; ``include_error=False`` leaves it out, and the sum is then
    the reconstruction). ``unit_activations``: every activation set to one (the
    weight-based basis of :func:`~bilinear_lens.sae.features.feature_interaction_matrix`;
    all features unless ``features``), which has no error writer: pass
    ``include_error=False``. Only ``normalize_activations="none"`` SAEs decode linearly, others
    are refused naming the field. ``extra["acts"]`` holds ``[n_positions, d_sae]``
    activations."""
    space, layer = sae_basis_space(model, sae)
    if sae.cfg.normalize_activations != "none":
        raise ValueError(
            f"sae.cfg.normalize_activations={sae.cfg.normalize_activations!r}: only 'none' decodes linearly "
            "into per-feature writers"
        )
    if unit_activations and include_error:
        raise ValueError("unit_activations=True has no error writer (x - x_hat is not defined): pass include_error=False")
    tokens = one_prompt_tokens(model, tokens)
    pos = resolve_positions(positions, tokens.shape[1], "positions")
    hook = sae.cfg.hook_name
    _, cache = model.run_with_cache(tokens, names_filter=[hook])
    x = cache[hook][0, pos]
    dtype = x.dtype
    acts = sae.encode(x).to(dtype)  # [n_pos, d_sae]
    if unit_activations:
        acts = torch.ones_like(acts)
    W_dec, b_dec = sae.W_dec.detach().to(dtype), sae.b_dec.detach().to(dtype)
    if features is None:
        chosen = (acts != 0).any(0).nonzero().flatten().tolist()
    else:
        chosen = [int(i) for i in features]
        bad = [i for i in chosen if not 0 <= i < W_dec.shape[0]]
        if bad:
            raise ValueError(f"features={bad[:8]} are out of range [0, {W_dec.shape[0]}) (the SAE's d_sae)")
    labels = [f"feature {i}" for i in chosen] + ["sae b_dec"]
    kinds = ["sae_feature"] * len(chosen) + ["sae_bias"]
    vectors = [acts[:, i, None] * W_dec[i] for i in chosen] + [b_dec.expand_as(x)]
    recon = acts @ W_dec + b_dec
    if include_error:
        labels.append("sae error"), kinds.append("sae_error"), vectors.append(x - recon)
    stacked = torch.stack(vectors) if vectors else x.new_zeros(0, *x.shape)
    return ResidualWriters(hook, pos, labels, kinds, stacked, x, tokens[0].clone(), space=space, layer=layer,
                           extra={"acts": acts, "features": chosen, "include_error": include_error})
