"""The MLP kinds a model can be built with: one table that config, MLPs, bridge and
spline codes all read.

=============  ======  ============  ===========================  ================
kind           gated   activation    default spline-code factors  module
=============  ======  ============  ===========================  ================
``bilinear``   yes     identity      ``("pre", "pre_linear")``    ``BilinearMLP``
``swiglu``     yes     silu          ``("pre",)``                 ``GatedMLP``
``relu``       no      relu          ``("pre",)``                 ``MLP``
``gelu``       no      gelu          ``("pre",)``                 ``MLP``
``linear``     no      identity      none (affine everywhere)     ``MLP``
``none``       attention-only: no MLP
=============  ======  ============  ===========================  ================

A gated kind computes ``act(x @ W_gate) * (x @ W_in)`` (3 ``d_model x d_mlp`` matrices), a
plain kind ``act(x @ W_in)`` (2 matrices). The activation names are keys of
:data:`bilinear_lens.models.mlp.ACTIVATIONS` and TransformerLens ``act_fn`` names alike.
The constructor is :func:`bilinear_lens.models.mlp.make_mlp`, which reads this table.
"""

from __future__ import annotations

from dataclasses import dataclass

from bilinear_lens.models.protocol import HookedModel


@dataclass(frozen=True)
class MLPKind:
    """One MLP kind: whether it is gated, its elementwise activation, and the hooks whose
    signs define a spline-code region by default (empty: the MLP is affine, one region)."""

    name: str
    gated: bool
    activation: str
    code_factors: tuple[str, ...]

    @property
    def is_bilinear(self) -> bool:
        """A gated kind without activation: the output is a quadratic form of the input."""
        return self.gated and self.activation == "identity"

    @property
    def n_matrices(self) -> int:
        """``d_model x d_mlp`` weight matrices in one MLP of this kind."""
        return 3 if self.gated else 2


MLP_KINDS: dict[str, MLPKind] = {
    kind.name: kind
    for kind in (
        MLPKind("bilinear", gated=True, activation="identity", code_factors=("pre", "pre_linear")),
        MLPKind("swiglu", gated=True, activation="silu", code_factors=("pre",)),
        MLPKind("relu", gated=False, activation="relu", code_factors=("pre",)),
        MLPKind("gelu", gated=False, activation="gelu", code_factors=("pre",)),
        MLPKind("linear", gated=False, activation="identity", code_factors=()),
    )
}
ATTN_ONLY = "none"
# Every value ModelConfig.mlp_kind accepts.
MLP_KIND_NAMES: tuple[str, ...] = (*MLP_KINDS, ATTN_ONLY)


def mlp_kind_spec(kind: str) -> MLPKind:
    """The table row of ``kind``; an attention-only or unknown kind raises ``ValueError``."""
    if kind not in MLP_KINDS:
        raise ValueError(f"mlp_kind={kind!r} is not an MLP kind; allowed: {sorted(MLP_KINDS)}")
    return MLP_KINDS[kind]


def model_mlp_kind(model: HookedModel) -> str:
    """The MLP kind of a model or of its ``TransformerBridge`` (whose config keeps it as
    ``bilinear_lens_mlp_kind``)."""
    cfg = model.cfg
    kind = getattr(cfg, "mlp_kind", None) or getattr(cfg, "bilinear_lens_mlp_kind", None)
    if kind is None:
        raise ValueError(f"{type(model).__name__} has no bilinear-lens MLP kind in its config")
    return str(kind)
