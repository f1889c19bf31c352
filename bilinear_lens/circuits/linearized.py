"""The model made exactly linear at one observed input, by hooks.

At the clean input ``x0`` three things are frozen to their clean values (constants, so no
gradient flows through them):

- every attention pattern (``blocks.{l}.attn.hook_pattern``): a head's output is then linear
  in its values, ``z = pattern0 @ v``;
- every norm scale (``*.hook_scale``, ``ln_final`` included): a norm is then linear
  (affine with a LayerNorm bias), ``(x - [mean]) / scale0 * w (+ b)``;
- every bilinear MLP is split symmetrically: ``post = (W x) * (V x)`` becomes
  ``post = 1/2 (W x) * (V x0) + 1/2 (W x0) * (V x)`` (stop-gradient on the other factor,
  with that factor held at its clean value). At ``x = x0`` the value is unchanged, and the
  Jacobian is half the true one, so ``J x0 = post`` exactly (Euler, degree 2): a
  gradient-times-input attribution through it sums to the output with no remainder.

The frozen model is affine in the residual writers at ``x0`` and agrees with the real
forward there. It is exact for the observed forward, not for counterfactuals through the
softmax or the norms. For non-bilinear MLPs (SwiGLU, ReLU, GELU) no exact split exists:
:func:`check_exact_mlps` refuses them for exact methods; with ``exact=False`` they keep
their own (non-linear) forward and attributions are flagged as approximate.

Shapes: ``hook_pattern`` ``[batch, head, query_pos, key_pos]``, ``hook_scale``
``[batch, pos, 1]``, ``mlp.hook_pre/hook_pre_linear/hook_post`` ``[batch, pos, d_mlp]``.
The frozen values are recorded with batch 1 and tiled to the batch of the hooked
forward (many copies of the prompt on the batch axis, as graph building uses). Patterns and
scales are frozen by :mod:`bilinear_lens.circuits.freezing` (the same hook names,
:func:`~bilinear_lens.circuits.freezing.frozen_hook_names`, and the same replacement hook,
:func:`~bilinear_lens.circuits.freezing.constant_hook`, as attribution patching uses); the
symmetric bilinear split is this module's own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from bilinear_lens.circuits.freezing import constant_hook, frozen_hook_names
from bilinear_lens.circuits.prompts import TokensLike, one_prompt_tokens
from bilinear_lens.models.mlp_kinds import mlp_kind_spec, model_mlp_kind

Hook = tuple[str, Callable[..., Any]]


def mlp_kinds(model: Any) -> list[str]:
    """The MLP kind of every layer (one kind per model here; ``"none"`` without MLPs)."""
    return [model_mlp_kind(model)] * model.cfg.n_layers


def check_exact_mlps(model: Any, what: str = "an exact attribution") -> None:
    """Refuse (one-line ``ValueError`` naming the layer and kind) a model with an MLP that is
    not bilinear: only a bilinear (degree-2 homogeneous) MLP splits exactly."""
    if getattr(model.cfg, "attn_only", False) or model_mlp_kind(model) == "none":
        return
    for layer, kind in enumerate(mlp_kinds(model)):
        if not mlp_kind_spec(kind).is_bilinear:
            raise ValueError(
                f"layer {layer} has mlp_kind={kind!r}, not 'bilinear': {what} is exact only for bilinear MLPs "
                "(pass exact=False to compute it anyway, flagged approximate)"
            )


def _has_mlp(model: Any, layer: int) -> bool:
    return hasattr(model.blocks[layer], "mlp")


def _is_bilinear(model: Any, layer: int) -> bool:
    return _has_mlp(model, layer) and mlp_kind_spec(model_mlp_kind(model)).is_bilinear


@dataclass
class FrozenValues:
    """The clean values a linearized forward holds fixed (batch 1).

    ``patterns[l]``: ``[1, head, pos, pos]``; ``scales[hook]``: ``[1, pos, 1]``;
    ``gates[l]``: ``(hook_pre, hook_pre_linear)`` of a bilinear MLP, each ``[1, pos, d_mlp]``.
    ``exact``: every MLP is bilinear (the frozen model is then affine and exact)."""

    tokens: Int[Tensor, "1 pos"]
    patterns: dict[int, Tensor] = field(default_factory=dict)
    scales: dict[str, Tensor] = field(default_factory=dict)
    gates: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    exact: bool = True


def record_frozen_values(model: Any, tokens: TokensLike) -> FrozenValues:
    """Run the clean forward once and record what :func:`linearization_hooks` freezes."""
    tokens = one_prompt_tokens(model, tokens)
    n_layers = model.cfg.n_layers
    names = set(frozen_hook_names(model))
    for l in range(n_layers):
        if _is_bilinear(model, l):
            names |= {f"blocks.{l}.mlp.hook_pre", f"blocks.{l}.mlp.hook_pre_linear"}
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=sorted(names))
    frozen = FrozenValues(tokens=tokens, exact=all(_is_bilinear(model, l) or not _has_mlp(model, l) for l in range(n_layers)))
    for l in range(n_layers):
        frozen.patterns[l] = cache[f"blocks.{l}.attn.hook_pattern"].detach()
        if _is_bilinear(model, l):
            frozen.gates[l] = (cache[f"blocks.{l}.mlp.hook_pre"].detach(), cache[f"blocks.{l}.mlp.hook_pre_linear"].detach())
    for name in frozen_hook_names(model, patterns=False):
        frozen.scales[name] = cache[name].detach()
    return frozen


def _symmetric_bilinear_hooks(layer: int, gate0: Tensor, linear0: Tensor) -> list[Hook]:
    """``hook_post = 1/2 pre * pre_linear0 + 1/2 pre0 * pre_linear``: the bilinear product with
    each factor's partner held at its clean value (value kept at the clean input, Jacobian
    halved, so gradient times input is exact)."""
    live: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(activation: Tensor, hook: Any) -> None:
            live[name] = activation

        return hook

    def split(post: Tensor, hook: Any) -> Tensor:
        pre, pre_linear = live.pop("pre"), live.pop("pre_linear")
        g0, l0 = gate0.to(post.dtype), linear0.to(post.dtype)
        return 0.5 * (pre * l0 + g0 * pre_linear)

    prefix = f"blocks.{layer}.mlp"
    return [(f"{prefix}.hook_pre", keep("pre")), (f"{prefix}.hook_pre_linear", keep("pre_linear")), (f"{prefix}.hook_post", split)]


def linearization_hooks(model: Any, frozen: FrozenValues) -> list[Hook]:
    """Forward hooks making ``model`` affine in its residual writers at ``frozen.tokens``:
    frozen patterns, frozen norm scales, symmetric bilinear splits (see module docstring)."""
    frozen_values = {f"blocks.{l}.attn.hook_pattern": p for l, p in frozen.patterns.items()} | frozen.scales
    hooks: list[Hook] = [(name, constant_hook(name, value)) for name, value in frozen_values.items()]
    for layer, (gate0, linear0) in frozen.gates.items():
        hooks += _symmetric_bilinear_hooks(layer, gate0, linear0)
    return hooks


@contextlib.contextmanager
def linearized(model: Any, tokens: Union[TokensLike, FrozenValues], exact: bool = True) -> Iterator[FrozenValues]:
    """Within the block, ``model``'s forwards are the linearized model at ``tokens`` (patterns
    and scales frozen, bilinear MLPs split symmetrically); yields the :class:`FrozenValues`.
    ``exact=True`` refuses non-bilinear MLPs (:func:`check_exact_mlps`)."""
    if exact:
        check_exact_mlps(model, "the linearized model")
    frozen = tokens if isinstance(tokens, FrozenValues) else record_frozen_values(model, tokens)
    with model.hooks(fwd_hooks=linearization_hooks(model, frozen)):
        yield frozen


def gradient_times_input(
    model: Any, tokens: TokensLike, metric: Callable[[Tensor], Tensor], exact: bool = True
) -> tuple[Float[Tensor, "pos"], float]:
    """Per-position attribution of ``metric(logits)`` (a scalar) to the token embeddings
    (``hook_embed`` plus ``hook_pos_embed`` if any) in the linearized model, and the metric's
    value. For a bilinear model without biases the attributions sum to the metric exactly."""
    with linearized(model, tokens, exact=exact) as frozen:
        probes: dict[str, Tensor] = {}

        def probe(activation: Tensor, hook: Any) -> Tensor:
            delta = torch.zeros_like(activation, requires_grad=True)
            probes[hook.name] = (activation.detach(), delta)
            return activation + delta

        names = ["hook_embed"] + (["hook_pos_embed"] if "hook_pos_embed" in model.hook_dict else [])
        with torch.enable_grad(), model.hooks(fwd_hooks=[(n, probe) for n in names]):
            value = metric(model(frozen.tokens))
            grads = torch.autograd.grad(value, [d for _, d in probes.values()])
    attribution = sum((g * a).sum(-1)[0] for (a, _), g in zip(probes.values(), grads))
    return attribution.detach(), float(value.detach())
