"""Hook-based ablation and activation patching: neurons, residual directions, eigen-components.

Every intervention is a TransformerLens forward hook. A ``*_hook(s)`` factory returns
``(hook_name, fn)`` pairs for ``model.run_with_hooks(tokens, fwd_hooks=[...])``; the
``ablate_*`` context manager of the same intervention installs them with ``model.hooks``::

    with ablate_neurons(model, layer=0, neurons=[3, 17], method="mean", reference=tokens):
        loss = model(tokens, return_type="loss")

Only ``hook_dict``, ``hooks``, ``run_with_hooks``, ``cfg`` and forward calls are used, so
everything runs on :class:`~bilinear_lens.models.model.BilinearTransformer` and on its
TransformerLens ``TransformerBridge`` (:func:`~bilinear_lens.models.bridge.to_bridge`) alike.

Ablation methods (what the ablated units are set to):

- ``"zero"``: 0;
- ``"mean"``: their mean over every batch row and position of a ``reference`` batch;
- ``"resample"``: their values at a random position of the ``reference`` batch. One source
  position ``(b', p')`` is drawn per ablated position and shared by all ablated units, so
  their joint distribution is kept (as in causal scrubbing). The draw depends only on
  ``seed`` and the activation's shape: every forward pass (and every copy of a sweep)
  sees the same resample.

Sweeps (:func:`ablation_sweep`, :func:`patch_neurons`) run many single-neuron
interventions per forward pass: the token batch is repeated ``k`` times along the batch
dim and copy ``j`` gets neuron ``j`` ablated (or patched). Copy ``j`` then computes the
same float ops as a one-neuron forward pass, so results match a one-at-a-time loop.
On :class:`~bilinear_lens.models.model.BilinearTransformer` the copies start at the ablated
activation itself: hook points before it (earlier blocks, the layer's attention and
``ln2``, the MLP's input projections) see only the unablated tokens, whose activations
the sweep computes once, and only the hook points after it see the ``k`` stacked copies.
On a ``TransformerBridge`` every hook point sees the copies.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from bilinear_lens.weights.directions import TokenLike, token_id
from bilinear_lens.weights.eigen import Eigendecomposition, eigendecompose
from bilinear_lens.models.hook_names import check_hook_names
from bilinear_lens.weights.tensor import BilinearWeights, interaction_matrix

METHODS = ("zero", "mean", "resample")
NEURON_HOOKS = ("hook_post", "hook_pre", "hook_pre_linear")
MLP_OUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
# Tokens per forward pass that ablation_sweep / patch_neurons aim for when
# ablations_per_pass is not given: bounds the activations and logits held at once.
DEFAULT_TOKENS_PER_PASS = 8192

HookFn = Callable[..., Optional[Tensor]]
FwdHook = tuple[str, HookFn]
MetricFn = Callable[[Float[Tensor, "batch pos d_vocab"]], Tensor]
NeuronsLike = Union[int, Sequence[int], Tensor]

__all__ = [
    "DEFAULT_TOKENS_PER_PASS",
    "METHODS",
    "MLP_OUT_HOOKS",
    "NEURON_HOOKS",
    "NeuronTable",
    "ablate_direction",
    "ablate_eigencomponents",
    "ablate_neurons",
    "ablation_sweep",
    "direction_ablation_hook",
    "eigen_ablation_hooks",
    "logit_diff_metric",
    "logit_metric",
    "loss_metric",
    "neuron_ablation_hook",
    "patch_neurons",
]


# ---- validation ---------------------------------------------------------------------------


def _where(model: Any) -> str:
    return type(model).__name__


def _check_layer(model: Any, layer: int) -> int:
    n_layers = model.cfg.n_layers
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has {n_layers} layers [0, {n_layers})")
    if f"blocks.{layer}.mlp.hook_in" not in model.hook_dict:
        raise ValueError(f"layer {layer} has no MLP (no hook 'blocks.{layer}.mlp.hook_in'; attention-only model?)")
    return layer


def _neuron_hook_name(model: Any, layer: int, hook: str) -> str:
    """``blocks.{layer}.mlp.{hook}``, checked against the model's hook points."""
    _check_layer(model, layer)
    if hook not in NEURON_HOOKS:
        raise ValueError(f"hook must be one of {NEURON_HOOKS} (an MLP neuron hook), got {hook!r}")
    name = f"blocks.{layer}.mlp.{hook}"
    check_hook_names(model.hook_dict, [name], where=_where(model))
    return name


def _neuron_indices(neurons: NeuronsLike, d_mlp: int) -> Int[Tensor, "n"]:
    """Sorted unique neuron indices (duplicates allowed in the input), range-checked."""
    if isinstance(neurons, Tensor) and neurons.dtype == torch.bool:
        if neurons.shape != (d_mlp,):
            raise ValueError(f"a boolean neuron mask must have shape ({d_mlp},), got {tuple(neurons.shape)}")
        neurons = neurons.nonzero().flatten()
    if isinstance(neurons, Tensor):
        if neurons.is_floating_point() or neurons.is_complex():
            raise TypeError(f"neuron indices must be integers, got a {neurons.dtype} tensor")
        values = [int(n) for n in neurons.flatten().tolist()]
    elif isinstance(neurons, int) and not isinstance(neurons, bool):
        values = [neurons]
    else:
        values = list(neurons)
        for n in values:
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"neuron indices must be ints, got {n!r} ({type(n).__name__})")
    bad = [n for n in values if not 0 <= n < d_mlp]
    if bad:
        raise ValueError(f"neuron indices {bad[:5]} out of range [0, {d_mlp}) (d_mlp={d_mlp})")
    return torch.tensor(sorted(set(values)), dtype=torch.long)


def _check_method(method: str, reference: Optional[Tensor]) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "zero" and reference is None:
        raise ValueError(f"method={method!r} needs reference tokens (reference=...) to take values from")


def _check_tokens(tokens: Tensor, name: str = "tokens") -> None:
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"{name} must be a [batch, pos] tensor of token ids, got {shape}")


# ---- replacement values -------------------------------------------------------------------


def _capture(model: Any, tokens: Int[Tensor, "batch pos"], hook_name: str) -> Tensor:
    """The activation at ``hook_name`` on ``tokens`` (detached)."""
    store: dict[str, Tensor] = {}

    def save(activation: Tensor, hook: Any) -> None:
        store["act"] = activation.detach()

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(hook_name, save)], return_type=None)
    return store["act"]


@dataclass(frozen=True)
class _Replacement:
    """What the ablated units of an activation ``[*batch, d]`` are set to.

    ``values(shape)`` is broadcastable to ``shape``: a scalar zero, the reference mean
    ``[d]``, a resample ``[*shape[:-1], d]``, or the clean activation (patching).
    """

    method: str  # "zero" | "mean" | "resample" | "patch"
    source: Optional[Tensor] = None  # mean [d] | reference rows [n_ref, d] | clean [*batch, d]
    seed: int = 0

    def values(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
        if self.method == "zero":
            return torch.zeros((), dtype=dtype, device=device)
        assert self.source is not None
        source = self.source.to(dtype=dtype, device=device)
        if self.method == "mean":
            return source
        if self.method == "patch":
            if source.shape != shape:
                raise ValueError(f"clean activation {tuple(source.shape)} does not match the run's {tuple(shape)}")
            return source
        # resample: a fresh generator per call, so the draw is a function of (seed, shape).
        gen = torch.Generator().manual_seed(self.seed)
        rows = torch.randint(source.shape[0], tuple(shape[:-1]), generator=gen)
        return source[rows.to(device)]


def _replacement(
    model: Any,
    hook_name: str,
    method: str,
    reference: Optional[Tensor],
    seed: int,
    read: Callable[[Tensor], Tensor] = lambda act: act,
) -> _Replacement:
    """Replacement values for ``method``; ``read`` maps a reference activation to the ablated
    quantity (the identity for neurons, the component ``[..., 1]`` along a direction)."""
    _check_method(method, reference)
    if method == "zero":
        return _Replacement("zero")
    assert reference is not None
    _check_tokens(reference, "reference")
    ref = read(_capture(model, reference, hook_name))
    ref = ref.reshape(-1, ref.shape[-1])  # [n_ref, d]: every batch row and position
    if method == "mean":
        return _Replacement("mean", ref.mean(0))
    return _Replacement("resample", ref, seed)


# ---- neuron ablation ----------------------------------------------------------------------


def _select_neurons_hook(mask: Tensor, replacement: _Replacement) -> HookFn:
    """Hook setting the neurons where ``mask [d_mlp]`` is true to ``replacement`` (out of place)."""

    def ablate(activation: Float[Tensor, "batch pos d_mlp"], hook: Any) -> Tensor:
        if activation.shape[-1] != mask.shape[0]:
            raise ValueError(f"{hook.name}: expected last dim {mask.shape[0]} (d_mlp), got {tuple(activation.shape)}")
        values = replacement.values(activation.shape, activation.dtype, activation.device)
        return torch.where(mask.to(activation.device), values, activation)

    return ablate


def neuron_ablation_hook(
    model: Any,
    layer: int,
    neurons: NeuronsLike,
    hook: str = "hook_post",
    method: str = "zero",
    reference: Optional[Int[Tensor, "ref_batch ref_pos"]] = None,
    seed: int = 0,
) -> FwdHook:
    """``(hook_name, fn)`` ablating ``neurons`` of layer ``layer``'s MLP at ``hook``.

    Args:
        model: a TransformerLens model (our model or a ``TransformerBridge``).
        layer: block index.
        neurons: an index, indices (duplicates are fine) or a boolean mask ``[d_mlp]``.
        hook: ``"hook_post"`` (the neuron's output), ``"hook_pre"`` or ``"hook_pre_linear"``
            (gated MLPs only).
        method: ``"zero"``, ``"mean"`` or ``"resample"`` (see the module docstring).
        reference: ``[batch, pos]`` tokens whose activations ``mean``/``resample`` use;
            captured once, here.
        seed: seed of the ``resample`` draw.
    """
    name = _neuron_hook_name(model, layer, hook)
    d_mlp = model.cfg.d_mlp
    mask = torch.zeros(d_mlp, dtype=torch.bool)
    mask[_neuron_indices(neurons, d_mlp)] = True
    return name, _select_neurons_hook(mask, _replacement(model, name, method, reference, seed))


@contextmanager
def ablate_neurons(
    model: Any,
    layer: int,
    neurons: NeuronsLike,
    hook: str = "hook_post",
    method: str = "zero",
    reference: Optional[Int[Tensor, "ref_batch ref_pos"]] = None,
    seed: int = 0,
) -> Iterator[None]:
    """Context manager: every forward pass inside runs with ``neurons`` ablated
    (arguments as in :func:`neuron_ablation_hook`)."""
    with model.hooks(fwd_hooks=[neuron_ablation_hook(model, layer, neurons, hook, method, reference, seed)]):
        yield


# ---- residual-direction ablation ----------------------------------------------------------


def _direction(direction: Tensor, d_model: int, name: str = "direction") -> Float[Tensor, "d_model"]:
    """``direction`` detached, checked to be a finite nonzero ``[d_model]`` vector."""
    if not isinstance(direction, Tensor) or direction.shape != (d_model,):
        shape = tuple(direction.shape) if isinstance(direction, Tensor) else type(direction).__name__
        raise ValueError(f"{name} must be a tensor of shape ({d_model},) (d_model), got {shape}")
    direction = direction.detach()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError(f"{name} must be finite and nonzero")
    return direction


def _unit(direction: Tensor, d_model: int) -> Float[Tensor, "d_model"]:
    direction = _direction(direction, d_model)
    return direction / direction.norm()


def direction_ablation_hook(
    model: Any,
    hook_name: str,
    direction: Float[Tensor, "d_model"],
    method: str = "zero",
    reference: Optional[Int[Tensor, "ref_batch ref_pos"]] = None,
    seed: int = 0,
) -> FwdHook:
    """``(hook_name, fn)`` ablating the component of a ``[..., d_model]`` activation along
    ``direction`` (e.g. at ``blocks.1.hook_resid_pre``): with ``d = direction / |direction|``,
    ``x <- x - (x . d - c) d`` where ``c`` is 0 (``"zero"``: project ``d`` out), the mean of
    ``x . d`` over ``reference`` (``"mean"``) or a resampled reference component.

    On a ``TransformerBridge``, ``blocks.{l}.hook_resid_mid`` aliases ``ln2.hook_in``: an
    edit there reaches the MLP's input but not the residual stream's skip path (on our
    model it reaches both). ``hook_resid_pre``/``hook_resid_post`` behave the same on both.
    """
    check_hook_names(model.hook_dict, [hook_name], where=_where(model))
    unit = _unit(direction, model.cfg.d_model)
    replacement = _replacement(
        model, hook_name, method, reference, seed, read=lambda act: (act @ unit.to(act))[..., None]
    )

    def ablate(activation: Float[Tensor, "... d_model"], hook: Any) -> Tensor:
        u = unit.to(activation)
        component = (activation @ u)[..., None]  # [..., 1]: the ablated quantity, as in `read`
        target = replacement.values(component.shape, activation.dtype, activation.device)
        return activation - (component - target) * u

    return hook_name, ablate


@contextmanager
def ablate_direction(
    model: Any,
    hook_name: str,
    direction: Float[Tensor, "d_model"],
    method: str = "zero",
    reference: Optional[Int[Tensor, "ref_batch ref_pos"]] = None,
    seed: int = 0,
) -> Iterator[None]:
    """Context manager form of :func:`direction_ablation_hook`."""
    with model.hooks(fwd_hooks=[direction_ablation_hook(model, hook_name, direction, method, reference, seed)]):
        yield


# ---- eigen-component ablation of a bilinear layer -----------------------------------------


def _bilinear_weights(model: Any, layer: int) -> BilinearWeights:
    """The layer's weights, refusing anything but a bilinear MLP without biases (where
    ``u . MLP(x) = x^T Q(u) x`` holds exactly)."""
    _check_layer(model, layer)
    mlp = model.blocks[layer].mlp
    why = "eigen-component ablation needs a bilinear MLP without biases"
    try:
        weights = BilinearWeights.from_module(mlp)
    except ValueError as err:
        raise ValueError(f"{why}; layer {layer}: {err}") from None
    with_bias = [name for name in ("b_in", "b_gate", "b_out") if getattr(weights, name) is not None]
    if with_bias:
        raise ValueError(f"{why}; layer {layer} has {', '.join(with_bias)} (built with mlp_bias=True)")
    return weights


def _kept_components(d: int, keep: Union[None, int, Sequence[int]], remove: Optional[Sequence[int]]) -> Tensor:
    """Indices (into the |lambda|-sorted eigenpairs) of the components the approximation keeps."""
    if (keep is None) == (remove is None):
        raise ValueError("pass exactly one of keep (an int k for the top-k, or indices) and remove (indices)")
    if isinstance(keep, int) and not isinstance(keep, bool):
        if not 0 <= keep <= d:
            raise ValueError(f"keep={keep}: k must be in [0, {d}]")
        return torch.arange(keep)
    chosen = keep if keep is not None else remove
    assert chosen is not None
    indices = [int(i) for i in (chosen.tolist() if isinstance(chosen, Tensor) else chosen)]
    bad = [i for i in indices if not 0 <= i < d]
    if bad:
        raise ValueError(f"component indices {bad[:5]} out of range [0, {d})")
    if keep is not None:
        return torch.tensor(sorted(set(indices)), dtype=torch.long)
    removed = set(indices)
    return torch.tensor([i for i in range(d) if i not in removed], dtype=torch.long)


def eigen_ablation_hooks(
    model: Any,
    layer: int,
    u: Float[Tensor, "d_model"],
    keep: Union[None, int, Sequence[int]] = None,
    remove: Optional[Sequence[int]] = None,
    out_hook: str = "hook_mlp_out",
    eig: Optional[Eigendecomposition] = None,
) -> list[FwdHook]:
    """Hooks replacing a bilinear layer's output along ``u`` by a subset of its eigen-components.

    With ``Q(u) = sum_i lambda_i v_i v_i^T`` (sorted by ``|lambda|``, see
    :func:`~bilinear_lens.weights.eigen.eigendecompose`), the layer output ``y`` is edited as
    ``y - (u . y - approx(x)) u / |u|^2`` with ``approx(x) = sum_{i in kept} lambda_i (v_i . x)^2``
    and ``x`` the MLP input. Only the component along ``u`` changes. ``keep=k`` keeps the
    top-``k`` (rank-``k`` approximation), ``keep=[i, ...]`` those components and
    ``remove=[i, ...]`` all but those. Keeping all ``d_model`` changes nothing (up to float
    rounding); ``keep=0`` removes the ``u`` component exactly.

    Returns two hooks: one capturing ``x`` at ``blocks.{layer}.mlp.hook_in`` and one editing
    ``y`` at ``blocks.{layer}.{out_hook}`` (``"hook_mlp_out"`` or ``"mlp.hook_out"``), which
    fires later in the same forward pass. ``eig`` reuses a decomposition of ``Q(u)`` already
    computed (component indices then refer to it).
    """
    weights = _bilinear_weights(model, layer)
    if out_hook not in MLP_OUT_HOOKS:
        raise ValueError(f"out_hook must be one of {MLP_OUT_HOOKS}, got {out_hook!r}")
    in_name, out_name = f"blocks.{layer}.mlp.hook_in", f"blocks.{layer}.{out_hook}"
    check_hook_names(model.hook_dict, [in_name, out_name], where=_where(model))
    d = weights.d_model
    u = _direction(u, d, name="u").to(dtype=weights.dtype, device=weights.device)
    if eig is None:
        eig = eigendecompose(interaction_matrix(weights, u))
    if eig.eigenvectors.shape != (d, eig.k):
        raise ValueError(f"eig must decompose one [{d}, {d}] matrix, has eigenvectors {tuple(eig.eigenvectors.shape)}")
    kept = _kept_components(eig.k, keep, remove).to(eig.eigenvalues.device)
    values, vectors = eig.eigenvalues[kept], eig.eigenvectors[:, kept]
    captured: dict[str, Tensor] = {}

    def capture_input(x: Float[Tensor, "batch pos d_model"], hook: Any) -> None:
        captured["x"] = x.detach()

    def replace_component(y: Float[Tensor, "batch pos d_model"], hook: Any) -> Tensor:
        if "x" not in captured:
            raise RuntimeError(f"{in_name} did not fire before {out_name} in this forward pass")
        x = captured.pop("x").to(y.dtype)
        approx = (x @ vectors.to(y)).pow(2) @ values.to(y)
        uu = u.to(y)
        return y - ((y @ uu) - approx)[..., None] * (uu / (uu @ uu))

    return [(in_name, capture_input), (out_name, replace_component)]


@contextmanager
def ablate_eigencomponents(
    model: Any,
    layer: int,
    u: Float[Tensor, "d_model"],
    keep: Union[None, int, Sequence[int]] = None,
    remove: Optional[Sequence[int]] = None,
    out_hook: str = "hook_mlp_out",
    eig: Optional[Eigendecomposition] = None,
) -> Iterator[None]:
    """Context manager form of :func:`eigen_ablation_hooks`."""
    with model.hooks(fwd_hooks=eigen_ablation_hooks(model, layer, u, keep, remove, out_hook, eig)):
        yield


# ---- metrics ------------------------------------------------------------------------------


def _at_position(logits: Float[Tensor, "batch pos d_vocab"], position: Optional[int]) -> Tensor:
    return logits if position is None else logits[:, position]


def loss_metric(tokens: Int[Tensor, "batch pos"]) -> MetricFn:
    """Mean next-token cross-entropy of ``tokens`` (as ``next_token_loss``, but computed in
    float64 for float64 logits, so exactness checks are not limited by float32)."""

    def loss(logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        log_probs = logits[:, :-1].to(dtype).log_softmax(-1)
        return -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device)).mean()

    return loss


def logit_metric(token: int, position: Optional[int] = -1) -> MetricFn:
    """Mean logit of ``token`` at ``position`` (``-1``: the last; ``None``: every position)."""

    def logit(logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        return _at_position(logits, position)[..., token].mean()

    return logit


def logit_diff_metric(token_a: int, token_b: int, position: Optional[int] = -1) -> MetricFn:
    """Mean ``logit[token_a] - logit[token_b]`` at ``position`` (as :func:`logit_metric`)."""

    def logit_diff(logits: Float[Tensor, "batch pos d_vocab"]) -> Tensor:
        at = _at_position(logits, position)
        return (at[..., token_a] - at[..., token_b]).mean()

    return logit_diff


def _named_metrics(
    model: Any,
    tokens: Tensor,
    metric: Union[None, MetricFn, Mapping[str, MetricFn]],
    logit: Optional[TokenLike],
    logit_diff: Optional[tuple[TokenLike, TokenLike]],
    position: Optional[int],
) -> dict[str, MetricFn]:
    metrics: dict[str, MetricFn] = {"loss": loss_metric(tokens)}
    if logit is not None:
        metrics["logit"] = logit_metric(token_id(model, logit), position)
    if logit_diff is not None:
        if len(logit_diff) != 2:
            raise ValueError(f"logit_diff must be a pair of tokens (a, b), got {logit_diff!r}")
        token_a, token_b = (token_id(model, token) for token in logit_diff)
        metrics["logit_diff"] = logit_diff_metric(token_a, token_b, position)
    if metric is not None:
        extra = dict(metric) if isinstance(metric, Mapping) else {"metric": metric}
        clash = set(extra) & set(metrics)
        if clash:
            raise ValueError(f"metric names {sorted(clash)} clash with the built-in metrics")
        metrics.update(extra)
    return metrics


def _evaluate(metrics: Mapping[str, MetricFn], logits: Tensor) -> dict[str, float]:
    return {name: float(fn(logits)) for name, fn in metrics.items()}


# ---- result table -------------------------------------------------------------------------


@dataclass(frozen=True)
class NeuronTable:
    """One row per neuron; columnar tensors, tidy rows on demand.

    ``columns["neuron"]`` holds the neuron indices; the other columns are ``float64``
    ``[n_rows]``. ``baseline`` holds the unintervened metric values.
    """

    layer: int
    hook: str
    method: str
    columns: dict[str, Tensor]
    baseline: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.columns["neuron"].shape[0])

    def __getitem__(self, column: str) -> Tensor:
        if column not in self.columns:
            raise KeyError(f"no column {column!r}; columns are {list(self.columns)}")
        return self.columns[column]

    @property
    def value_columns(self) -> list[str]:
        return [name for name in self.columns if name != "neuron"]

    def rows(self) -> list[dict[str, Union[int, float]]]:
        """``[{"neuron": 3, "delta_loss": 0.01, ...}, ...]`` in table order."""
        lists = {name: col.tolist() for name, col in self.columns.items()}
        return [{name: lists[name][i] for name in lists} for i in range(len(self))]

    def sort_by(self, column: Optional[str] = None, by_abs: bool = True, descending: bool = True) -> "NeuronTable":
        """Rows reordered by ``column`` (default: the first value column), by magnitude unless
        ``by_abs=False``. Ties keep neuron order."""
        key = self[column or self.value_columns[0]]
        key = key.abs() if by_abs else key
        # NaN (e.g. normalized effect with clean == corrupted) sorts last either way.
        key = key.nan_to_num(nan=-torch.inf if descending else torch.inf)
        return self._rows_at(key.argsort(descending=descending, stable=True))

    def top(self, k: int, by: Optional[str] = None) -> "NeuronTable":
        """The ``k`` rows with the largest ``|by|`` (default: the first value column)."""
        return self.sort_by(by)._rows_at(slice(0, k))

    def _rows_at(self, index: Union[Tensor, slice]) -> "NeuronTable":
        columns = {name: col[index] for name, col in self.columns.items()}
        return NeuronTable(self.layer, self.hook, self.method, columns, dict(self.baseline))

    def to_pandas(self) -> Any:
        """A ``pandas.DataFrame`` (pandas is optional; imported here)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - pandas is installed in dev envs
            raise ImportError("NeuronTable.to_pandas needs pandas; use .rows() without it") from err
        return pd.DataFrame({name: col.cpu().numpy() for name, col in self.columns.items()})


# ---- batched single-neuron sweeps ---------------------------------------------------------


def _one_neuron_per_copy(neurons: Int[Tensor, "k"], replacement: _Replacement) -> Callable[[Tensor], Tensor]:
    """``copies [k, batch, pos, d_mlp] -> copies`` with neuron ``neurons[j]`` of copy ``j`` set
    to its replacement value, written in place (pass a fresh tensor).

    Each copy holds what :func:`_select_neurons_hook` gives a single-neuron run: the same
    replacement values at its neuron, the activation elsewhere. Writing ``k`` columns costs
    less than a ``where`` over every neuron of every copy.
    """
    k = neurons.shape[0]

    def replace(copies: Float[Tensor, "k batch pos d_mlp"]) -> Float[Tensor, "k batch pos d_mlp"]:
        values = replacement.values(copies.shape[1:], copies.dtype, copies.device)
        index = neurons.to(copies.device)
        own = values.expand(copies.shape[1:])[..., index].movedim(-1, 0)  # [k, batch, pos]: copy j's neuron
        copies[torch.arange(k, device=copies.device), ..., index] = own
        return copies

    return replace


def _one_neuron_per_copy_hook(neurons: Int[Tensor, "k"], batch: int, replacement: _Replacement) -> HookFn:
    """Hook for a batch of ``k`` stacked copies ``[k * batch, pos, d_mlp]``: copy ``j`` gets
    neuron ``neurons[j]`` replaced (out of place; see :func:`_one_neuron_per_copy`)."""
    replace = _one_neuron_per_copy(neurons, replacement)

    def ablate(activation: Float[Tensor, "k_batch pos d_mlp"], hook: Any) -> Tensor:
        copies = activation.view(neurons.shape[0], batch, *activation.shape[1:]).clone()
        return replace(copies).view(activation.shape)

    return ablate


def _ablations_per_pass(requested: Optional[int], tokens: Tensor) -> int:
    if requested is None:
        return max(1, DEFAULT_TOKENS_PER_PASS // max(1, tokens.numel()))
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"ablations_per_pass must be a positive int, got {requested!r}")
    return requested


# (k neurons, replacement) -> logits [k * batch, pos, d_vocab] of k copies, copy j with neuron j replaced
CopiesForward = Callable[[Tensor, _Replacement], Tensor]


def _starts_inside_mlp(model: Any) -> bool:
    """Whether copies can restart inside the ablated MLP: only on our model, whose block
    arithmetic :func:`_forward_from_mlp` mirrors (a TransformerBridge runs whole forwards)."""
    from bilinear_lens.models.model import BilinearTransformer

    return isinstance(model, BilinearTransformer)


def _full_forward(model: Any, tokens: Int[Tensor, "batch pos"], hook_name: str) -> CopiesForward:
    """Each copy is a whole forward pass of ``tokens`` with the hook at ``hook_name``."""

    def forward(neurons: Int[Tensor, "k"], replacement: _Replacement) -> Tensor:
        hook = _one_neuron_per_copy_hook(neurons, tokens.shape[0], replacement)
        return model.run_with_hooks(tokens.repeat(neurons.shape[0], 1), fwd_hooks=[(hook_name, hook)])

    return forward


def _forward_from_mlp(model: Any, tokens: Int[Tensor, "batch pos"], hook_name: str) -> CopiesForward:
    """Each copy restarts at the ablated activation ``blocks.{l}.mlp.{hook}`` of our model.

    Everything before that activation (the earlier blocks, block ``l``'s attention and
    ``ln2``, the MLP's input projections) is the same for every copy: it runs once on
    ``tokens``. Each copy then redoes, as ``GatedMLP``/``MLP`` and ``TransformerBlock``
    do, only what follows: ``post_from_pre`` and ``hook_post`` (when ``pre`` or
    ``pre_linear`` is ablated), ``out``, ``hook_out``, ``hook_mlp_out``, ``resid_mid +
    mlp_out``, ``hook_resid_post`` and the later blocks (``start_at_layer``).
    """
    _, layer_str, _, ablated = hook_name.split(".")
    layer = int(layer_str)
    block = model.blocks[layer]
    mlp = block.mlp
    if ablated == "hook_post":
        inputs = ["hook_post"]
    else:  # post is recomputed from the pre-activations, ablated one included
        inputs = ["hook_pre", "hook_pre_linear"] if mlp.gated else ["hook_pre"]
    resid_name = f"blocks.{layer}.hook_resid_mid"
    names = {name: f"blocks.{layer}.mlp.{name}" for name in inputs}
    _, cache = model.run_with_cache(tokens, names_filter=[resid_name, *names.values()], stop_at_layer=layer + 1)

    def forward(neurons: Int[Tensor, "k"], replacement: _Replacement) -> Tensor:
        k = neurons.shape[0]
        # [k, batch, pos, d_mlp]: views of the clean activations; the ablated one is copied
        acts = {name: cache[full].expand(k, *cache[full].shape) for name, full in names.items()}
        acts[ablated] = _one_neuron_per_copy(neurons, replacement)(acts[ablated].clone())
        if ablated == "hook_post":
            post = acts[ablated].flatten(0, 1)
        else:  # hook points see the copies stacked along batch: [k * batch, pos, d_mlp]
            post = mlp.hook_post(mlp.post_from_pre(*acts.values()).flatten(0, 1))
        mlp_out = block.hook_mlp_out(mlp.hook_out(mlp.out(post)))
        resid = block.hook_resid_post(cache[resid_name].repeat(k, 1, 1) + mlp_out)
        return model(resid, start_at_layer=layer + 1)

    return forward


def _sweep(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    hook_name: str,
    neurons: Int[Tensor, "n"],
    replacement: _Replacement,
    metrics: Mapping[str, MetricFn],
    ablations_per_pass: int,
    progress: bool,
    desc: str,
) -> dict[str, Float[Tensor, "n"]]:
    """Metric values with each neuron replaced in turn, ``ablations_per_pass`` per forward.

    On our model each copy starts at the ablated activation (:func:`_forward_from_mlp`):
    hook points before it run once, on the unablated ``tokens``, and only those after it
    run on the copies. The copies compute the same operations on the same inputs as
    one-neuron forward passes, so the numbers are the same. Other models
    (``TransformerBridge``) run every copy from the tokens.
    """
    batch = tokens.shape[0]
    make_forward = _forward_from_mlp if _starts_inside_mlp(model) else _full_forward
    out = {name: torch.empty(neurons.shape[0], dtype=torch.float64) for name in metrics}
    with torch.no_grad(), tqdm(total=neurons.shape[0], desc=desc, unit="neuron", disable=not progress) as bar:
        forward = make_forward(model, tokens, hook_name)
        for start in range(0, neurons.shape[0], ablations_per_pass):
            chunk = neurons[start : start + ablations_per_pass]
            k = chunk.shape[0]
            logits = forward(chunk, replacement)
            for j, copy_logits in enumerate(logits.view(k, batch, *logits.shape[1:])):
                for name, value in _evaluate(metrics, copy_logits).items():
                    out[name][start + j] = value
            bar.update(k)
    return out


def _all_or_given(neurons: Optional[NeuronsLike], d_mlp: int) -> Tensor:
    return torch.arange(d_mlp) if neurons is None else _neuron_indices(neurons, d_mlp)


def ablation_sweep(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    neurons: Optional[NeuronsLike] = None,
    hook: str = "hook_post",
    method: str = "zero",
    reference: Optional[Int[Tensor, "ref_batch ref_pos"]] = None,
    seed: int = 0,
    metric: Union[None, MetricFn, Mapping[str, MetricFn]] = None,
    logit: Optional[TokenLike] = None,
    logit_diff: Optional[tuple[TokenLike, TokenLike]] = None,
    position: Optional[int] = -1,
    ablations_per_pass: Optional[int] = None,
    progress: bool = True,
) -> NeuronTable:
    """Effect of ablating each neuron of layer ``layer``'s MLP on its own.

    Columns: ``neuron``, ``delta_loss`` (ablated minus clean mean next-token loss over
    ``tokens``) and, when asked for, ``delta_logit`` (mean logit of token ``logit``),
    ``delta_logit_diff`` (mean ``logit[a] - logit[b]``) and ``delta_<name>`` for each
    custom ``metric`` (a TransformerLens-style ``logits -> scalar`` callable, ``"metric"``
    when unnamed, or a mapping name -> callable). Logit metrics read ``position``: ``-1``
    (default) is the last position, as for a prompt whose next token is the answer;
    ``None`` averages every position. Rows are in neuron order; use
    :meth:`NeuronTable.top`/:meth:`NeuronTable.sort_by` to rank them.

    Batched: ``ablations_per_pass`` ablations share a forward pass by repeating ``tokens``
    along the batch dim (default: about :data:`DEFAULT_TOKENS_PER_PASS` tokens per pass).
    ``method="mean"``/``"resample"`` take values from ``reference`` (default: ``tokens``).
    Pass equal-length (unpadded) rows: padding would count in the loss.
    """
    _check_tokens(tokens)
    hook_name = _neuron_hook_name(model, layer, hook)
    d_mlp = model.cfg.d_mlp
    indices = _all_or_given(neurons, d_mlp)
    reference = tokens if reference is None and method != "zero" else reference
    replacement = _replacement(model, hook_name, method, reference, seed)
    metrics = _named_metrics(model, tokens, metric, logit, logit_diff, position)
    per_pass = _ablations_per_pass(ablations_per_pass, tokens)
    with torch.no_grad():
        baseline = _evaluate(metrics, model(tokens))
    desc = f"{method}-ablating {hook_name}"
    ablated = _sweep(model, tokens, hook_name, indices, replacement, metrics, per_pass, progress, desc)
    columns = {"neuron": indices}
    columns.update({f"delta_{name}": values - baseline[name] for name, values in ablated.items()})
    return NeuronTable(layer, hook, method, columns, baseline)


def patch_neurons(
    model: Any,
    clean_tokens: Int[Tensor, "batch pos"],
    corrupted_tokens: Int[Tensor, "batch pos"],
    layer: int,
    neurons: Optional[NeuronsLike] = None,
    hook: str = "hook_post",
    *,
    metric: MetricFn,
    ablations_per_pass: Optional[int] = None,
    progress: bool = True,
) -> NeuronTable:
    """Activation patching of single neurons from a clean run into a corrupted run.

    As in TransformerLens' ``patching`` module: run ``corrupted_tokens`` with one neuron's
    activation at ``hook`` replaced by its value (same batch row and position) on
    ``clean_tokens``, and evaluate ``metric`` (``logits -> scalar``, e.g.
    :func:`logit_diff_metric`) on the patched logits. Columns: ``neuron``,
    ``effect`` (``patched - corrupted``), ``patched`` (the metric of the patched run) and
    ``normalized`` (``effect / (clean - corrupted)``: 1 means the neuron alone restores the
    clean metric; NaN or inf when clean and corrupted agree). ``baseline`` holds the
    ``clean`` and ``corrupted`` metric values. Batched like :func:`ablation_sweep`.
    """
    _check_tokens(clean_tokens, "clean_tokens")
    _check_tokens(corrupted_tokens, "corrupted_tokens")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(
            f"clean_tokens {tuple(clean_tokens.shape)} and corrupted_tokens {tuple(corrupted_tokens.shape)} "
            "must have the same shape (positions are patched one-to-one)"
        )
    hook_name = _neuron_hook_name(model, layer, hook)
    indices = _all_or_given(neurons, model.cfg.d_mlp)
    metrics = {"metric": metric}
    clean_act: dict[str, Tensor] = {}

    def save(activation: Tensor, hook: Any) -> None:
        clean_act["act"] = activation.detach()

    with torch.no_grad():
        clean = _evaluate(metrics, model.run_with_hooks(clean_tokens, fwd_hooks=[(hook_name, save)]))["metric"]
        corrupted = _evaluate(metrics, model(corrupted_tokens))["metric"]
    replacement = _Replacement("patch", clean_act["act"])
    per_pass = _ablations_per_pass(ablations_per_pass, corrupted_tokens)
    desc = f"patching {hook_name}"
    swept = _sweep(model, corrupted_tokens, hook_name, indices, replacement, metrics, per_pass, progress, desc)
    patched = swept["metric"]
    effect = patched - corrupted
    # effect first: the column NeuronTable.top ranks by default.
    columns = {"neuron": indices, "effect": effect, "patched": patched, "normalized": effect / (clean - corrupted)}
    return NeuronTable(layer, hook, "patch", columns, {"clean": clean, "corrupted": corrupted})
