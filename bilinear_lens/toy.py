"""Toy models of superposition (Elhage et al. 2022) with linear, ReLU and bilinear hidden layers.

``n_features`` sparse features are squeezed through ``n_hidden < n_features`` hidden dims and
reconstructed. Each feature is zero with probability ``sparsity`` and otherwise
``uniform[0, 1]``; feature ``i`` has importance ``I_i = importance_decay**i`` and the loss is
``sum_i I_i (x_i - x'_i)^2`` (mean over the batch). Hidden-layer kinds:

==============  ===========================  ==================================
kind            hidden ``h``                 reconstruction ``x'``
==============  ===========================  ==================================
``linear``      ``W x``                      ``ReLU(W^T h + b)`` (tied)
``relu``        ``ReLU(W x)``                ``ReLU(W^T h + b)`` (tied by default)
``bilinear``    ``(W1 x) * (W2 x)``          ``ReLU(W_dec h + b)`` (always untied)
==============  ===========================  ==================================

A leading ``instances`` dimension trains independent copies at once (as the original code
does): every weight is ``[instances, ...]`` and every activation ``[batch, instances, ...]``.

The point of the module is the *privileged basis* question: a linear hidden layer commutes
with any rotation ``h -> R h`` (undone by ``W_dec -> W_dec R^T``), so its neuron basis means
nothing; an elementwise operation (ReLU, or the product of the bilinear layer) does not,
see :func:`rotation_invariance` and :func:`alignment_score`.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from bilinear_lens.models.config import config_error, is_int, is_number

TOY_KINDS = ("linear", "relu", "bilinear")


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise config_error("ToyConfig", field_name, value, allowed)


@dataclass
class ToyConfig:
    """Shape and data distribution of a toy model of superposition.

    Attributes:
        n_features: number of input features ``n``.
        n_hidden: hidden width ``m``; must be smaller than ``n_features`` (superposition).
        kind: hidden layer, one of ``linear``, ``relu``, ``bilinear`` (see module docstring).
        sparsity: ``S`` in ``[0, 1)``, the probability that a feature is zero.
        importance_decay: ``I_i = importance_decay**i``, in ``(0, 1]``.
        n_instances: independent copies trained together.
        tied_decoder: decode with ``W^T`` (the classic model). ``None`` picks ``True`` for
            ``linear``/``relu`` and ``False`` for ``bilinear``, which has two encoders and so
            no single matrix to tie to (``True`` with ``bilinear`` is an error). ``relu`` is
            tied by default as in Elhage et al.; untied, it reached a worse loss at low
            sparsity and collapsed onto fewer features in our runs (20 features, 5 hidden).
    """

    n_features: int = 20
    n_hidden: int = 5
    kind: str = "linear"
    sparsity: float = 0.9
    importance_decay: float = 0.9
    n_instances: int = 1
    tied_decoder: Optional[bool] = None

    def __post_init__(self) -> None:
        for name in ("n_features", "n_hidden", "n_instances"):
            if not is_int(getattr(self, name)) or getattr(self, name) <= 0:
                _fail(name, getattr(self, name), "must be a positive integer")
        if self.n_hidden >= self.n_features:
            _fail("n_hidden", self.n_hidden, f"must be smaller than n_features={self.n_features}")
        if self.kind not in TOY_KINDS:
            _fail("kind", self.kind, f"allowed values are {list(TOY_KINDS)}")
        if not is_number(self.sparsity) or not 0.0 <= self.sparsity < 1.0:
            _fail("sparsity", self.sparsity, "must be a number in [0, 1)")
        if not is_number(self.importance_decay) or not 0.0 < self.importance_decay <= 1.0:
            _fail("importance_decay", self.importance_decay, "must be a number in (0, 1]")
        if self.tied_decoder is None:
            self.tied_decoder = self.kind != "bilinear"
        if not isinstance(self.tied_decoder, bool):
            _fail("tied_decoder", self.tied_decoder, "must be true, false or None")
        if self.tied_decoder and self.kind == "bilinear":
            _fail("tied_decoder", self.tied_decoder, "must be False (or None) for kind='bilinear'")

    @property
    def feature_probability(self) -> float:
        """``1 - sparsity``: the probability that a feature is non-zero."""
        return 1.0 - self.sparsity

    def importance(self) -> Float[Tensor, "n_features"]:
        """``I_i = importance_decay**i`` for ``i = 0 .. n_features-1``."""
        return self.importance_decay ** torch.arange(self.n_features, dtype=torch.float64)


def generate_batch(
    cfg: ToyConfig,
    batch_size: int,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "batch instances n_features"]:
    """Sample ``x[b, k, i] = max(0, (v - S) / (1 - S))`` with ``v ~ uniform[0, 1]``.

    One uniform draw does both jobs: ``v < S`` (probability ``S = cfg.sparsity``) gives a
    zero feature, and given ``v >= S`` the rescaled ``(v - S) / (1 - S)`` is uniform on
    ``[0, 1]``, so this is the "zero with probability S, else uniform[0, 1]" distribution at
    half the sampling cost of two draws.
    """
    shape = (batch_size, cfg.n_instances, cfg.n_features)
    v = torch.rand(shape, generator=generator, dtype=dtype)
    return ((v - cfg.sparsity) / (1.0 - cfg.sparsity)).clamp_min(0.0)


def _xavier_normal(
    n_instances: int, fan_out: int, fan_in: int, generator: torch.Generator
) -> Float[Tensor, "instances fan_out fan_in"]:
    std = (2.0 / (fan_in + fan_out)) ** 0.5
    return torch.randn(n_instances, fan_out, fan_in, generator=generator) * std


class ToyModel(nn.Module):
    """A batch of ``cfg.n_instances`` toy models of superposition (see module docstring).

    Parameters (``k`` = instances, ``m`` = hidden, ``n`` = features):
        ``W`` ``[k, m, n]`` the encoder (``W1`` for bilinear), so a feature's embedding is
        the column ``W[k, :, i]``; ``W2`` ``[k, m, n]`` (bilinear only); ``W_dec_free``
        ``[k, n, m]`` (untied decoders only); ``b`` ``[k, n]``.
    """

    def __init__(self, cfg: ToyConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        k, m, n = cfg.n_instances, cfg.n_hidden, cfg.n_features
        self.W = nn.Parameter(_xavier_normal(k, m, n, gen))
        self.W2: Optional[nn.Parameter] = None
        self.W_dec_free: Optional[nn.Parameter] = None
        if cfg.kind == "bilinear":
            self.W2 = nn.Parameter(_xavier_normal(k, m, n, gen))
        if not cfg.tied_decoder:
            self.W_dec_free = nn.Parameter(_xavier_normal(k, n, m, gen))
        self.b = nn.Parameter(torch.zeros(k, n))
        self.register_buffer("importance", cfg.importance().float())

    @property
    def W_dec(self) -> Float[Tensor, "instances n_features n_hidden"]:
        """The decoder: ``W^T`` when tied, else the free matrix."""
        if self.W_dec_free is None:
            return self.W.transpose(-1, -2)
        return self.W_dec_free

    def hidden(
        self, x: Float[Tensor, "batch instances n_features"]
    ) -> Float[Tensor, "batch instances n_hidden"]:
        """``h = W x`` (linear), ``ReLU(W x)`` (relu) or ``(W x) * (W2 x)`` (bilinear)."""
        pre = torch.einsum("kmn,bkn->bkm", self.W, x)
        if self.cfg.kind == "relu":
            return F.relu(pre)
        if self.cfg.kind == "bilinear":
            assert self.W2 is not None
            return pre * torch.einsum("kmn,bkn->bkm", self.W2, x)
        return pre

    def decode(
        self, h: Float[Tensor, "batch instances n_hidden"]
    ) -> Float[Tensor, "batch instances n_features"]:
        """``x' = ReLU(W_dec h + b)``."""
        return F.relu(torch.einsum("knm,bkm->bkn", self.W_dec, h) + self.b)

    def forward(
        self, x: Float[Tensor, "batch instances n_features"]
    ) -> Float[Tensor, "batch instances n_features"]:
        """The reconstruction ``x' = decode(hidden(x))``."""
        return self.decode(self.hidden(x))

    def loss_per_instance(
        self, x: Float[Tensor, "batch instances n_features"]
    ) -> Float[Tensor, "instances"]:
        """``mean_b sum_i I_i (x_i - x'_i)^2`` for each instance."""
        err = (x - self(x)) ** 2
        return (err * self.importance.to(err.dtype)).sum(-1).mean(0)

    def feature_embeddings(self) -> Float[Tensor, "instances n_hidden n_features"]:
        """The hidden activation of each feature alone: column ``i`` is ``h(e_i)``.

        ``W[:, i]`` for ``linear``, ``ReLU(W[:, i])`` for ``relu`` and
        ``W1[:, i] * W2[:, i]`` for ``bilinear``: what the neurons carry when only feature
        ``i`` is on (at value 1; the direction is the same for any value > 0).
        """
        eye = torch.eye(self.cfg.n_features, dtype=self.W.dtype, device=self.W.device)
        one_hots = eye[:, None, :].expand(-1, self.cfg.n_instances, -1)
        return self.hidden(one_hots).permute(1, 2, 0)


@contextmanager
def _torch_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (``None``: leave as is), then restore."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_toy_model(
    cfg: ToyConfig,
    steps: int = 2000,
    batch_size: int = 1024,
    lr: float = 1e-2,
    seed: int = 0,
    num_threads: Optional[int] = 1,
) -> ToyModel:
    """Train a :class:`ToyModel` with Adam on fresh batches from :func:`generate_batch`.

    Minimises ``sum_k loss_k`` over instances ``k`` (each instance's parameters only see
    its own loss, so instances train independently). ``seed`` fixes both the init and the
    data stream: the same arguments give bitwise-identical weights.

    ``num_threads`` (default 1) is the torch intra-op thread count used while training:
    the matmuls here are tiny, so threading gains nothing, and on a busy machine OpenMP
    spin-waiting made 2 threads 10x slower than 1. One thread also keeps the result
    independent of the machine's core count. ``None`` keeps the current setting.
    """
    with _torch_threads(num_threads):
        model = ToyModel(cfg, seed=seed)
        data_gen = torch.Generator().manual_seed(seed + 1_000_003)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            x = generate_batch(cfg, batch_size, generator=data_gen)
            loss = model.loss_per_instance(x).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model


@torch.no_grad()
def evaluate_loss(
    model: ToyModel, batch_size: int = 16384, seed: int = 12345
) -> Float[Tensor, "instances"]:
    """Loss per instance on one fixed held-out batch (same ``seed`` -> same batch)."""
    gen = torch.Generator().manual_seed(seed)
    x = generate_batch(model.cfg, batch_size, generator=gen, dtype=model.W.dtype)
    return model.loss_per_instance(x)


def random_rotation(m: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Float[Tensor, "m m"]:
    """A Haar-random orthogonal ``m x m`` matrix: ``Q`` of the QR of a Gaussian matrix,
    with column signs fixed by ``sign(diag(R))`` (without the fix Q is not Haar-uniform)."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return (q * signs).to(dtype)


@torch.no_grad()
def rotate_hidden(model: ToyModel, rotation: Float[Tensor, "n_hidden n_hidden"]) -> ToyModel:
    """A copy of ``model`` with its hidden basis rotated by ``R``.

    Encoders ``W -> R W`` (and ``W2 -> R W2``), so the hidden *pre-activations* become
    ``R (W x)``; the decoder ``W_dec -> W_dec R^T`` undoes the rotation. A tied decoder
    ``W^T`` follows automatically. For ``linear`` the output is unchanged; for ``relu``
    and ``bilinear`` the elementwise operation does not commute with ``R``.
    """
    rotated = copy.deepcopy(model)
    R = rotation.to(model.W.dtype)
    rotated.W.copy_(torch.einsum("ij,kjn->kin", R, model.W))
    if model.W2 is not None and rotated.W2 is not None:
        rotated.W2.copy_(torch.einsum("ij,kjn->kin", R, model.W2))
    if model.W_dec_free is not None and rotated.W_dec_free is not None:
        rotated.W_dec_free.copy_(torch.einsum("knj,ij->kni", model.W_dec_free, R))
    return rotated


@torch.no_grad()
def rotation_invariance(
    model: ToyModel,
    rotation: Float[Tensor, "n_hidden n_hidden"],
    batch_size: int = 4096,
    seed: int = 0,
) -> float:
    """How much rotating the hidden basis changes the output, in float64.

    Returns ``max_k ||x'_R - x'||_F / ||x'||_F``: the relative change of the reconstruction
    of instance ``k`` over a batch from the model's own data distribution, where ``x'_R``
    comes from :func:`rotate_hidden`. 0 (to float64 precision, ~1e-15) for a linear hidden
    layer; clearly positive when the hidden layer is elementwise nonlinear.
    """
    base = copy.deepcopy(model).double()
    rotated = rotate_hidden(base, rotation.double())
    gen = torch.Generator().manual_seed(seed)
    x = generate_batch(model.cfg, batch_size, generator=gen, dtype=torch.float64)
    out, out_rot = base(x), rotated(x)
    diff = torch.linalg.vector_norm(out_rot - out, dim=(0, 2))
    scale = torch.linalg.vector_norm(out, dim=(0, 2)).clamp_min(torch.finfo(torch.float64).tiny)
    return (diff / scale).max().item()


def feature_alignment(
    embeddings: Float[Tensor, "... n_hidden n_features"]
) -> Float[Tensor, "... n_features"]:
    """Per-feature basis alignment ``a_i = max_h E[h, i]^2 / sum_h E[h, i]^2``.

    The largest share of feature ``i``'s squared embedding norm that sits on one neuron:
    1 when the embedding is a single neuron (axis-aligned), ``1/m`` when it is spread
    evenly over all ``m`` neurons. A zero column gives NaN.
    """
    sq = embeddings.pow(2)
    return sq.amax(dim=-2) / sq.sum(dim=-2)


def alignment_score(
    embeddings: Float[Tensor, "... n_hidden n_features"], min_relative_norm: float = 0.5
) -> Float[Tensor, "..."]:
    """Mean :func:`feature_alignment` over the *represented* features.

    Feature ``i`` is represented if ``||E[:, i]|| >= min_relative_norm * max_j ||E[:, j]||``.
    Range ``[1/m, 1]``: 1 when every represented feature sits on a single neuron, ``1/m``
    when each is spread evenly over all ``m`` neurons. A linear hidden layer trained from a
    rotation-invariant init has no preferred basis, so it scores like a random direction
    (about 0.5 for ``m = 5``).
    """
    # Why this score: the privileged-basis question is whether features get their own
    # neurons, and the largest one-neuron share answers it directly with fixed bounds
    # (1 axis-aligned, 1/m fully spread), unlike kurtosis, whose scale depends on m.
    # Unrepresented features (norm ~0 after training) point in noise directions, so they
    # are left out; the threshold is relative to the largest norm so that it is scale free
    # (bilinear embeddings W1 * W2 are on a different scale from W).
    norms = torch.linalg.vector_norm(embeddings, dim=-2)
    represented = norms >= min_relative_norm * norms.amax(dim=-1, keepdim=True)
    per_feature = torch.where(represented, feature_alignment(embeddings), torch.zeros_like(norms))
    return per_feature.sum(-1) / represented.sum(-1)


def model_alignment_score(
    model: ToyModel, min_relative_norm: float = 0.5
) -> Float[Tensor, "instances"]:
    """:func:`alignment_score` of :meth:`ToyModel.feature_embeddings` (``h(e_i)``), per instance.

    Measured on the hidden *activations* rather than the encoder weights because that is
    what the neuron basis carries: for ``relu`` a negative pre-activation never reaches a
    neuron, and a tied ReLU model uses negative weights to cancel interference, so
    ``W[:, i] = (1, -.5, -.5, -.5, -.5)`` is a one-neuron feature. Caveat: the ReLU zeroes
    about half the entries of any column, so even a random ``relu`` init scores above
    ``linear``; compare with :func:`alignment_score` of ``model.W`` and of an untrained
    model (``analysis/toy_privileged_basis.py`` reports both).
    """
    with torch.no_grad():
        return alignment_score(model.feature_embeddings(), min_relative_norm)
