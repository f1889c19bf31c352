"""MLP blocks with TransformerLens hook points: the bilinear MLP and its baselines.

Every MLP kind the toolkit builds lives here, with one layout so the kinds compare
fairly and so TransformerLens' ``TransformerBridge`` can map them:

- gated kinds (``bilinear``, ``swiglu``) hold ``nn.Linear`` submodules ``gate``, ``in``
  and ``out`` (the slots of TransformerLens' ``GatedMLPBridge``);
- plain kinds (``relu``, ``gelu``, ``linear``) hold ``in`` and ``out`` (``MLPBridge``).

Weights are stored as ``nn.Linear`` (``[out_features, in_features]``) and exposed through
TransformerLens-orientation properties ``W_in``/``W_gate`` ``[d_model, d_mlp]`` and
``W_out`` ``[d_mlp, d_model]``, the same orientation ``TransformerBridge`` reports, so
weight-based analysis code runs on either object.

Hook points, named as in TransformerLens' gated MLP:

=================  ==========================  =====================
hook               gated kinds                 plain kinds
=================  ==========================  =====================
``hook_in``        input ``x``                 input ``x``
``hook_pre``       ``x @ W_gate + b_gate``     ``x @ W_in + b_in``
``hook_pre_linear`` ``x @ W_in + b_in``         (absent)
``hook_post``      ``act(pre) * pre_linear``   ``act(pre)``
``hook_out``       output                      output
=================  ==========================  =====================

For the bilinear MLP ``act`` is the identity, so
``out = W_out^T ((W_in^T x + b_in) * (W_gate^T x + b_gate)) + b_out``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, cast

import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from bilinear_lens.models.mlp_kinds import mlp_kind_spec

Activation = Callable[[Tensor], Tensor]

# name -> elementwise function; None is the identity (bilinear / linear MLPs).
ACTIVATIONS: dict[str, Optional[Activation]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "identity": None,
}


def _activation(name: str) -> Optional[Activation]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; allowed: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _weight_view(slot: str) -> property:
    """``W`` of the ``nn.Linear`` in ``slot`` in TransformerLens orientation
    (``weight.T``: ``[in_features, out_features]``, a view, no copy)."""
    # ``in`` is a Python keyword, so every slot is read by name.
    return property(lambda self: cast(nn.Linear, getattr(self, slot)).weight.T, doc=f"``{slot}.weight.T``")


def _bias_view(slot: str) -> property:
    """The bias of the ``nn.Linear`` in ``slot`` (``None`` without one)."""
    return property(lambda self: cast(nn.Linear, getattr(self, slot)).bias, doc=f"``{slot}.bias``")


class _WeightViews:
    """TransformerLens-orientation views of the ``nn.Linear`` weights (no copies)."""

    W_in = _weight_view("in")  # [d_model, d_mlp]
    b_in = _bias_view("in")  # [d_mlp] or None
    W_out = _weight_view("out")  # [d_mlp, d_model]
    b_out = _bias_view("out")  # [d_model] or None


class _MLPBase(_WeightViews, nn.Module):
    """What every MLP kind shares: the layout (``[gate,] in, out`` and their hook points)
    and the part of the forward pass after the pre-activations, used by ``forward`` and by
    callers that resume a forward pass inside the MLP (ablation sweeps:
    :meth:`~bilinear_lens.models.model.TransformerBlock.forward_from_mlp`).

    ``pre_hooks`` names the hook points :meth:`post_from_pre` reads, in argument order.
    """

    gated: bool
    pre_hooks: tuple[str, ...]
    post_from_pre: Callable[..., Tensor]

    def __init__(self, d_model: int, d_mlp: int, act: str, bias: bool):
        super().__init__()
        self.d_model, self.d_mlp, self.act_name = d_model, d_mlp, act
        self.act = _activation(act)
        if self.gated:  # registered first: init_weights draws in module order
            self.gate = nn.Linear(d_model, d_mlp, bias=bias)
        # ``in`` is a Python keyword: register it by name (TransformerLens' native model
        # and GatedMLPBridge address the slot the same way).
        self.add_module("in", nn.Linear(d_model, d_mlp, bias=bias))
        self.out = nn.Linear(d_mlp, d_model, bias=bias)
        self.hook_in = HookPoint()  # [batch, pos, d_model]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        if self.gated:
            self.hook_pre_linear = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]
        self.hook_out = HookPoint()  # [batch, pos, d_model]

    def forward_from_pre(self, *pre: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_model"]:
        """From the values at ``pre_hooks`` on: ``hook_post``, ``out``, ``hook_out``."""
        return self.forward_from_post(self.hook_post(self.post_from_pre(*pre)))

    def forward_from_post(self, post: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_model"]:
        """From the value at ``hook_post`` on: ``out``, ``hook_out``."""
        return self.hook_out(self.out(post))

    def resume_inputs(self, hook: str) -> tuple[str, ...]:
        """The hook points whose values :meth:`forward_after` needs to resume after ``hook``:
        ``hook_post`` itself, or every pre-activation (``post`` is recomputed from them)."""
        if hook == "hook_post":
            return ("hook_post",)
        if hook in self.pre_hooks:
            return self.pre_hooks
        allowed = ("hook_post", *self.pre_hooks)
        raise ValueError(f"{type(self).__name__} cannot resume after {hook!r}; allowed: {allowed}")

    def forward_after(self, hook: str, acts: Mapping[str, Tensor]) -> Float[Tensor, "... d_model"]:
        """The MLP output when the forward pass resumes right after hook point ``hook``,
        given the values ``acts`` at :meth:`resume_inputs` (``hook`` has fired on them)."""
        names = self.resume_inputs(hook)
        if hook == "hook_post":
            return self.forward_from_post(acts["hook_post"])
        return self.forward_from_pre(*(acts[name] for name in names))


class GatedMLP(_MLPBase):
    """``out = W_out^T (act(W_gate^T x + b_gate) * (W_in^T x + b_in)) + b_out``.

    ``act="silu"`` is SwiGLU; ``act="identity"`` is the bilinear MLP (see :class:`BilinearMLP`).
    """

    gated = True
    pre_hooks = ("hook_pre", "hook_pre_linear")

    def __init__(self, d_model: int, d_mlp: int, act: str = "silu", bias: bool = False):
        super().__init__(d_model, d_mlp, act, bias)

    W_gate = _weight_view("gate")  # [d_model, d_mlp]
    b_gate = _bias_view("gate")  # [d_mlp] or None

    def post_from_pre(
        self, pre: Float[Tensor, "... d_mlp"], pre_linear: Float[Tensor, "... d_mlp"]
    ) -> Float[Tensor, "... d_mlp"]:
        """``act(pre) * pre_linear``: the elementwise step between ``hook_pre``/``hook_pre_linear``
        and ``hook_post`` (no hooks run)."""
        return (pre if self.act is None else self.act(pre)) * pre_linear

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        x = self.hook_in(x)
        pre = self.hook_pre(self.gate(x))
        pre_linear = self.hook_pre_linear(getattr(self, "in")(x))
        return self.forward_from_pre(pre, pre_linear)


class BilinearMLP(GatedMLP):
    """The bilinear MLP: a GLU with no elementwise nonlinearity.

    ``out = W_out^T ((W_in^T x + b_in) * (W_gate^T x + b_gate)) + b_out``. With no biases
    (the default, as in Pearce et al. 2024) it is the third-order tensor
    ``B[a, i, j] = sum_h W_out[h, a] W_in[i, h] W_gate[j, h]`` applied to ``x`` twice,
    so ``u . out = x^T Q(u) x`` (see :mod:`bilinear_lens.weights.tensor`).
    """

    def __init__(self, d_model: int, d_mlp: int, bias: bool = False):
        super().__init__(d_model, d_mlp, act="identity", bias=bias)


class MLP(_MLPBase):
    """``out = W_out^T act(W_in^T x + b_in) + b_out`` (``act`` relu, gelu, or identity)."""

    gated = False
    pre_hooks = ("hook_pre",)

    def __init__(self, d_model: int, d_mlp: int, act: str = "relu", bias: bool = False):
        super().__init__(d_model, d_mlp, act, bias)

    def post_from_pre(self, pre: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_mlp"]:
        """``act(pre)``: the elementwise step between ``hook_pre`` and ``hook_post`` (no hooks
        run)."""
        return pre if self.act is None else self.act(pre)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        x = self.hook_in(x)
        pre = self.hook_pre(getattr(self, "in")(x))
        return self.forward_from_pre(pre)


def make_mlp(kind: str, d_model: int, d_mlp: int, bias: bool = False) -> nn.Module:
    """Build the MLP of ``kind`` (a key of :data:`~bilinear_lens.models.mlp_kinds.MLP_KINDS`,
    whose row says whether it is gated and which activation it applies)."""
    spec = mlp_kind_spec(kind)
    if spec.is_bilinear:
        return BilinearMLP(d_model, d_mlp, bias=bias)
    cls = GatedMLP if spec.gated else MLP
    return cls(d_model, d_mlp, act=spec.activation, bias=bias)
