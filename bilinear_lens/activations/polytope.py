"""The polytope lens (Black et al. 2022): regions over a dataset, boundaries along paths, purity.

Built on :mod:`bilinear_lens.activations.spline_codes` (what a token's code is; read its docstring for
what a "region" means for each MLP kind, bilinear layers included).

- **Regions over a dataset.** :class:`RegionTracker` streams packed codes batch by batch
  and keeps a count per region, a bounded reservoir of example contexts per region, a
  bounded reservoir of codes for Hamming statistics and, when tokens carry labels,
  ``(region, label)`` counts. Memory grows with the number of distinct regions, never
  with the number of tokens. :func:`track_regions` runs a model over token batches into
  a tracker.
- **Boundary density along a path.** :func:`residual_path_profile` (a straight line
  between two residual vectors) and :func:`embedding_path_profile` (between two tokens'
  embeddings at one position of a prompt) give a :class:`PathProfile`: plot-ready arrays
  of position, cumulative distance, code changes per step and Hamming distance to the
  start.
- **Purity.** The paper's prediction: regions are purer w.r.t. a label than clusters of
  directions. :func:`compare_purity` reports both, with the caveats made numbers: plain
  purity is 1 whenever clusters are singletons, so :class:`PurityReport` also has the
  size-weighted purity of clusters with at least ``min_size`` tokens and the expected
  purity of a label-shuffled assignment with the same cluster sizes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from itertools import repeat
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float, Int, UInt8
from torch import Tensor

from bilinear_lens.activations.capture import capture_activations
from bilinear_lens.activations.code_subsets import subset_codes, subset_layout
from bilinear_lens.activations.kmeans import kmeans
from bilinear_lens.activations.region_counts import RegionCounts
from bilinear_lens.activations.spline_codes import (
    Layers,
    code_layout,
    codes_from_activations,
    hamming,
    pairwise_hamming,
    region_ids,
    residual_codes,
)
from bilinear_lens.data.synthetic import word_class
from bilinear_lens.distributed import all_gather_int64, current_ranks
from bilinear_lens.models.protocol import HookedModel
from bilinear_lens.progress import progress_bar

ArrayLike = Union[np.ndarray, Tensor]


def _numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


# ---- regions over a dataset ------------------------------------------------------------------


class RegionTracker:
    """Streaming region statistics; memory is O(distinct regions), not O(tokens).

    ``update`` takes a batch of packed codes (and optionally one context object and one
    integer label per token; label ``< 0`` means unlabelled). Region ids are
    :func:`~bilinear_lens.activations.spline_codes.region_ids` (64-bit hashes of the codes). Examples
    are a uniform reservoir sample (Algorithm R) of ``examples_per_region`` contexts per
    region, over the tokens that came with contexts; codes for Hamming statistics a uniform
    reservoir of ``hamming_sample`` tokens. Counts do not depend on how the stream is split
    into batches.

    Memory: 16 bytes per region in a :class:`~bilinear_lens.activations.region_counts.RegionCounts`
    (plus its merge buffer), a ``(region, label)`` entry per pair seen, ``hamming_sample``
    codes and, once contexts are given, a dict entry (the reservoir's position) and at most
    ``examples_per_region`` contexts per region. Counting alone does no Python work per
    token; sampling examples does (a dict lookup and update per token with a context).
    """

    def __init__(
        self, examples_per_region: int = 3, hamming_sample: int = 1024, n_units: Optional[int] = None, seed: int = 0
    ):
        _check_counts(examples_per_region=examples_per_region, hamming_sample=hamming_sample)
        self.examples_per_region = examples_per_region
        self.hamming_sample = hamming_sample
        self.n_units = n_units
        self._regions = RegionCounts()
        self.label_counts: Counter[tuple[int, int]] = Counter()
        self.n_tokens = 0
        self._examples: dict[int, list[Any]] = {}
        # Tokens offered to each region's example reservoir (those with contexts): a dict,
        # because every batch looks up each of its tokens' regions.
        self._offered: Counter[int] = Counter()
        self._sample: Optional[np.ndarray] = None
        self._n_sampled = 0
        self._rng = np.random.default_rng(seed)

    @property
    def n_regions(self) -> int:
        return len(self._regions)

    @property
    def counts(self) -> Counter[int]:
        """Tokens per region id, as a ``Counter`` snapshot (built on each access: O(regions))."""
        return self._regions.to_counter()

    def update(
        self,
        packed: UInt8[ArrayLike, "n n_bytes"],
        contexts: Optional[Sequence[Any]] = None,
        labels: Optional[Int[ArrayLike, "n"]] = None,
    ) -> None:
        """Add a batch of codes (rows of ``packed``; leading axes are flattened)."""
        codes = _numpy(packed)
        codes = codes.reshape(-1, codes.shape[-1])
        ids = region_ids(codes)
        if contexts is not None and len(contexts) != ids.size:
            raise ValueError(f"got {len(contexts)} contexts for {ids.size} codes")
        if labels is not None:
            labels = _numpy(labels).reshape(-1)
            if labels.shape[0] != ids.size:
                raise ValueError(f"got {labels.shape[0]} labels for {ids.size} codes")
        if self.examples_per_region > 0 and contexts is not None:
            self._sample_examples(ids, contexts)
        self._regions.add(ids)
        if labels is not None:
            self._count_labels(ids, labels)
        self._sample_codes(codes)
        self.n_tokens += ids.size

    def _sample_examples(self, ids: np.ndarray, contexts: Sequence[Any]) -> None:
        k = self.examples_per_region
        id_list = ids.tolist()
        prior = np.fromiter(map(self._offered.get, id_list, repeat(0)), dtype=np.int64, count=len(id_list))
        self._offered.update(id_list)
        seen = prior + _rank_within_groups(ids) + 1  # 1-based index in the region's reservoir stream
        keep = np.flatnonzero((seen <= k) | (self._rng.random(len(id_list)) * seen < k))
        slots = self._rng.integers(0, k, size=keep.size)
        for i, slot in zip(keep.tolist(), slots.tolist()):
            examples = self._examples.setdefault(id_list[i], [])
            item = _own_copy(contexts[i])
            if seen[i] <= k:
                examples.append(item)
            else:
                examples[slot] = item

    def _count_labels(self, ids: np.ndarray, labels: np.ndarray) -> None:
        labelled = labels >= 0
        self.label_counts.update(zip(ids[labelled].tolist(), labels[labelled].tolist()))

    def _sample_codes(self, codes: np.ndarray) -> None:
        size = self.hamming_sample
        if size <= 0 or codes.shape[0] == 0:
            return
        if self._sample is None:
            self._sample = np.zeros((size, codes.shape[1]), dtype=np.uint8)
        elif self._sample.shape[1] != codes.shape[1]:
            raise ValueError(f"codes have {codes.shape[1]} bytes; earlier batches had {self._sample.shape[1]}")
        seen = self.n_tokens + np.arange(1, codes.shape[0] + 1)
        keep = np.flatnonzero((seen <= size) | (self._rng.random(codes.shape[0]) * seen < size))
        slots = np.where(seen[keep] <= size, seen[keep] - 1, self._rng.integers(0, size, size=keep.size))
        # Later tokens win a contested slot, as in sequential Algorithm R.
        self._sample[slots] = codes[keep]
        self._n_sampled = min(size, self._n_sampled + codes.shape[0])

    # ---- results ----
    def most_common(self, n: int = 10) -> list[tuple[int, int]]:
        """The ``n`` largest regions as ``(region_id, count)`` (ties: smaller id first)."""
        return self._regions.most_common(n)

    def examples(self, region_id: int) -> list[Any]:
        """Up to ``examples_per_region`` contexts of tokens in the region."""
        return list(self._examples.get(region_id, []))

    def region_sizes(self) -> np.ndarray:
        """Tokens per region, one entry per region (unordered)."""
        return self._regions.ids_and_counts()[1].copy()

    def size_stats(self) -> dict[str, float]:
        """Tokens-per-region statistics."""
        sizes = self.region_sizes()
        if sizes.size == 0:
            return {"mean": 0.0, "median": 0.0, "max": 0, "singleton_regions": 0, "tokens_in_singletons": 0.0, "tokens_in_top10": 0.0}
        top = np.sort(sizes)[::-1]
        return {
            "mean": float(sizes.mean()),
            "median": float(np.median(sizes)),
            "max": int(top[0]),
            "singleton_regions": int((sizes == 1).sum()),
            "tokens_in_singletons": float((sizes == 1).sum() / self.n_tokens),
            "tokens_in_top10": float(top[:10].sum() / self.n_tokens),
        }

    def code_sample(self) -> np.ndarray:
        """The reservoir of packed codes (uniform over all tokens seen)."""
        return np.zeros((0, 0), np.uint8) if self._sample is None else self._sample[: self._n_sampled].copy()

    def hamming_stats(self) -> dict[str, float]:
        """Pairwise Hamming distances between distinct sampled tokens: mean, median, and
        (when ``n_units`` is known) the mean as a fraction of units."""
        sample = self.code_sample()
        if sample.shape[0] < 2:
            return {"n_sampled": int(sample.shape[0]), "mean": float("nan"), "median": float("nan")}
        distances = pairwise_hamming(sample).numpy()
        upper = distances[np.triu_indices(sample.shape[0], k=1)]
        stats = {"n_sampled": int(sample.shape[0]), "mean": float(upper.mean()), "median": float(np.median(upper))}
        if self.n_units:
            stats["mean_fraction"] = stats["mean"] / self.n_units
        return stats

    def purity_report(self, min_size: int = 5, n_shuffles: int = 20, seed: int = 0) -> "PurityReport":
        """Purity of regions w.r.t. the labels given to ``update`` (labelled tokens only)."""
        if not self.label_counts:
            raise ValueError("no labelled tokens: pass labels to update()")
        keys = np.array(list(self.label_counts.keys()), dtype=np.uint64).reshape(-1, 2)
        values = np.fromiter(self.label_counts.values(), dtype=np.int64, count=len(self.label_counts))
        return _report(_Contingency.from_pairs(keys[:, 0], keys[:, 1].astype(np.int64), values), min_size, n_shuffles, seed)


def _rank_within_groups(keys: np.ndarray) -> np.ndarray:
    """For each element, how many earlier elements share its key."""
    _, inverse = np.unique(keys, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sorted_keys = inverse[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, keys.size]))
    rank = np.empty(keys.size, dtype=np.int64)
    rank[order] = np.arange(keys.size) - group_start
    return rank


def _own_copy(item: Any) -> Any:
    """Contexts kept by the tracker must not pin the caller's whole batch in memory."""
    if isinstance(item, np.ndarray):
        return tuple(item.tolist())
    if isinstance(item, Tensor):
        return tuple(item.tolist())
    return item


def context_windows(tokens: Int[Tensor, "batch pos"], width: int) -> Int[np.ndarray, "batch*pos width"]:
    """For each token, the ``width`` token ids ending at it (``-1`` before the sequence start)."""
    ids = _numpy(tokens).astype(np.int64)
    padded = np.concatenate([np.full((ids.shape[0], width - 1), -1, dtype=np.int64), ids], axis=1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, width, axis=1)
    return windows.reshape(-1, width)


def decode_context(tokenizer: Any, window: Sequence[int]) -> str:
    """Render a context window as ``"text before [token]"``."""
    ids = [int(i) for i in window if int(i) >= 0]
    if not ids:
        return ""
    before = tokenizer.decode(ids[:-1], skip_special_tokens=True)
    return f"{before}[{tokenizer.decode(ids[-1:])}]"


def word_class_labels(tokenizer: Any, d_vocab: int) -> tuple[np.ndarray, list[str]]:
    """Per token id, the :func:`~bilinear_lens.data.synthetic.word_class` of the decoded token as
    an index into the returned class names; ``-1`` for ``"other"`` (sub-word pieces,
    punctuation, special tokens), which purity then ignores."""
    classes = [word_class(tokenizer.decode([i])) for i in range(d_vocab)]
    names = sorted({c for c in classes if c != "other"})
    index = {name: i for i, name in enumerate(names)}
    return np.array([index.get(c, -1) for c in classes], dtype=np.int64), names


@dataclass
class ActivationSample:
    """In-memory sample of tokens from a :func:`track_regions` pass (for k-means on
    activations, :func:`compare_purity`, or on codes, :func:`~bilinear_lens.activations.code_clusters.cluster_codes`)."""

    region_ids: np.ndarray  # [n] uint64
    activations: np.ndarray  # [n, d] float32, at ``hook_name``
    token_ids: np.ndarray  # [n]
    hook_name: str
    codes: Optional[np.ndarray] = None  # [n, n_bytes] uint8: the tokens' packed codes (those region_ids hash)


def _check_counts(**counts: Any) -> None:
    """``ValueError`` naming the first argument that is not an int ``>= 0``."""
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _checked_token_labels(token_labels: Optional[ArrayLike], d_vocab: int) -> Optional[np.ndarray]:
    """``token_labels`` as an int64 array of one label per token id (``[d_vocab]``), or a
    ``ValueError`` naming it."""
    if token_labels is None:
        return None
    labels = _numpy(token_labels)
    if labels.ndim != 1 or labels.shape[0] != d_vocab:
        raise ValueError(
            f"token_labels must hold one label per token id, shape ({d_vocab},) (d_vocab), got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"token_labels must be integers (-1: unlabelled), got dtype {labels.dtype}")
    return labels.astype(np.int64, copy=False)


@torch.no_grad()
def track_regions(
    model: HookedModel,
    batches: Iterable[Int[Tensor, "batch pos"]],
    layers: Layers = 0,
    factors: Optional[Sequence[str]] = None,
    ignore_tokens: Sequence[int] = (),
    token_labels: Optional[Int[np.ndarray, "d_vocab"]] = None,
    examples_per_region: int = 3,
    context_width: int = 8,
    hamming_sample: int = 1024,
    sample_hook: Optional[str] = None,
    sample_size: int = 0,
    seed: int = 0,
    progress: bool = True,
    masks: Optional[Iterable[Tensor]] = None,
    code_units: Optional[Mapping[str, np.ndarray]] = None,
) -> tuple[RegionTracker, Optional[ActivationSample]]:
    """Stream ``batches`` of tokens through ``model`` into a :class:`RegionTracker`.

    Tokens in ``ignore_tokens`` (e.g. BOS/padding, whose codes would pile into one
    region) are skipped, and so are positions where ``masks`` (one bool tensor per batch,
    its shape; e.g. :func:`~bilinear_lens.data.packing.count_mask`) is False. ``token_labels`` maps token id to label (``-1``: unlabelled).
    With ``sample_hook`` and ``sample_size > 0`` the activations at that hook of the
    first ``sample_size`` kept tokens are returned too, with their region ids and packed
    codes (:class:`ActivationSample`). Batches
    go to the model's device; ``progress`` shows a progress bar. Under ``torchrun`` rank ``r``
    runs batches ``i % world_size == r`` and all ranks end with the merged region, label
    and token counts (``RegionCounts.merge``), equal to one process'; example contexts and
    the code and activation samples are reservoirs over the rank's own batches.
    ``code_units`` (``{hook_name: unit indices}`` for every hook of the code, e.g. from
    :func:`~bilinear_lens.activations.code_subsets.choose_units`) restricts the code to those
    units (:func:`~bilinear_lens.activations.code_subsets.subset_codes`): coarser regions.
    """
    token_labels = _checked_token_labels(token_labels, model.cfg.d_vocab)
    _check_counts(examples_per_region=examples_per_region, hamming_sample=hamming_sample, sample_size=sample_size)
    if isinstance(context_width, bool) or not isinstance(context_width, int) or context_width < 1:
        raise ValueError(f"context_width must be an int >= 1 (tokens per example context), got {context_width!r}")
    layout = code_layout(model, layers, factors)
    kept_layout = layout if code_units is None else subset_layout(layout, code_units)
    tracker = RegionTracker(examples_per_region, hamming_sample, n_units=kept_layout.n_units, seed=seed)
    names = layout.hook_names + ([sample_hook] if sample_hook and sample_hook not in layout.hook_names else [])
    ignore = np.asarray(list(ignore_tokens), dtype=np.int64)
    sampled: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    n_sampled = 0
    ranks = current_ranks()
    device = next(model.parameters()).device
    bar = progress_bar(batches, desc="polytope regions", unit="batch", enabled=progress and ranks.is_main)
    mask_iter = iter(masks) if masks is not None else None
    for i, tokens in enumerate(bar):
        mask = next(mask_iter) if mask_iter is not None else None
        if not ranks.owns(i):
            continue
        tokens = tokens.to(device)
        cache = capture_activations(model, tokens, names)
        token_ids = _numpy(tokens).reshape(-1).astype(np.int64)
        counted = ~np.isin(token_ids, ignore)
        if mask is not None:
            if tuple(mask.shape) != tuple(tokens.shape):
                raise ValueError(f"mask of batch {i} has shape {tuple(mask.shape)}, its tokens {tuple(tokens.shape)}")
            counted &= _numpy(mask).reshape(-1).astype(bool)
        keep = np.flatnonzero(counted)
        full_codes = codes_from_activations(cache, layout)
        if code_units is not None:
            full_codes = subset_codes(full_codes, layout, code_units)
        codes = full_codes.numpy().reshape(token_ids.size, -1)[keep]
        contexts = context_windows(tokens, context_width)[keep] if examples_per_region > 0 else None
        labels = token_labels[token_ids[keep]] if token_labels is not None else None
        tracker.update(codes, contexts, labels)
        if sample_hook and n_sampled < sample_size:
            take = keep[: sample_size - n_sampled]
            acts = cache[sample_hook].detach().float().cpu().numpy().reshape(token_ids.size, -1)[take]
            sampled.append((region_ids(codes[: take.size]), acts, token_ids[take], codes[: take.size].copy()))
            n_sampled += take.size
    if ranks.world_size > 1:
        _merge_counts_across_ranks(tracker)
    if not sample_hook or sample_size <= 0:
        return tracker, None
    if not sampled:
        return tracker, ActivationSample(np.zeros(0, np.uint64), np.zeros((0, 0), np.float32), np.zeros(0, np.int64),
                                         sample_hook, np.zeros((0, kept_layout.n_bytes), np.uint8))
    ids, acts, toks, codes = (np.concatenate(parts) for parts in zip(*sampled))
    return tracker, ActivationSample(ids, acts, toks, sample_hook, codes)


def _merge_counts_across_ranks(tracker: RegionTracker) -> None:
    """Replace each rank's region counts, label counts and token count by their sums over ranks."""
    ids, counts = tracker._regions.ids_and_counts()
    tables = zip(all_gather_int64(ids.view(np.int64)), all_gather_int64(counts))
    merged = RegionCounts()
    for rank_ids, rank_counts in tables:
        merged = merged.merge(RegionCounts.from_ids_and_counts(rank_ids.view(np.uint64), rank_counts))
    tracker._regions = merged
    pairs = np.array(list(tracker.label_counts), dtype=np.uint64).reshape(-1, 2)
    values = np.fromiter(tracker.label_counts.values(), dtype=np.int64, count=len(tracker.label_counts))
    gathered = zip(*(all_gather_int64(a) for a in (pairs[:, 0].view(np.int64), pairs[:, 1].astype(np.int64), values)))
    tracker.label_counts = Counter()
    for region, label, count in gathered:
        tracker.label_counts.update(dict(zip(zip(region.view(np.uint64).tolist(), label.tolist()), count.tolist())))
    tracker.n_tokens = int(sum(int(n[0]) for n in all_gather_int64(np.array([tracker.n_tokens]))))


# ---- boundary density along a path ---------------------------------------------------------


@dataclass(frozen=True)
class PathProfile:
    """Code changes along a path of ``n_steps + 1`` points (plot-ready arrays).

    ``changes[i]`` is the Hamming distance between the codes of points ``i - 1`` and
    ``i`` (``changes[0] = 0``): how many unit boundaries the step crossed, at least (a
    unit that crosses twice inside one step is missed; refine ``n_steps`` to check).
    """

    t: np.ndarray  # [n_points] in [0, 1]
    distance: np.ndarray  # [n_points] cumulative Euclidean path length
    changes: np.ndarray  # [n_points] int
    hamming_to_start: np.ndarray  # [n_points] int
    n_units: int

    @property
    def length(self) -> float:
        return float(self.distance[-1])

    @property
    def n_flips(self) -> int:
        """Total unit flips along the path (sum of ``changes``)."""
        return int(self.changes.sum())

    @property
    def n_boundary_steps(self) -> int:
        """Steps whose endpoints lie in different regions."""
        return int((self.changes > 0).sum())

    @property
    def flips_per_unit_distance(self) -> float:
        return self.n_flips / self.length if self.length > 0 else float("nan")

    @property
    def boundary_steps_per_unit_distance(self) -> float:
        return self.n_boundary_steps / self.length if self.length > 0 else float("nan")

    def as_dict(self) -> dict[str, Any]:
        data = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(self).items()}
        data.update(
            length=self.length,
            n_flips=self.n_flips,
            n_boundary_steps=self.n_boundary_steps,
            flips_per_unit_distance=self.flips_per_unit_distance,
        )
        return data


def interpolate(
    start: Float[Tensor, "d"], end: Float[Tensor, "d"], n_steps: int
) -> tuple[Float[Tensor, "n_points"], Float[Tensor, "n_points d"]]:
    """``n_steps + 1`` evenly spaced points from ``start`` to ``end`` (both included)."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    t = torch.linspace(0, 1, n_steps + 1, dtype=start.dtype, device=start.device)
    return t, start[None, :] + t[:, None] * (end - start)[None, :]


def path_profile(
    t: Float[ArrayLike, "n_points"], points: Float[ArrayLike, "n_points d"], codes: UInt8[ArrayLike, "n_points n_bytes"], n_units: int
) -> PathProfile:
    """Profile of codes sampled along a path of points."""
    points_np, codes_np = _numpy(points).astype(np.float64), _numpy(codes)
    steps = np.linalg.norm(np.diff(points_np, axis=0), axis=1)
    changes = np.r_[0, hamming(codes_np[1:], codes_np[:-1]).numpy()].astype(np.int64)
    return PathProfile(
        t=_numpy(t).astype(np.float64),
        distance=np.r_[0.0, np.cumsum(steps)],
        changes=changes,
        hamming_to_start=hamming(codes_np, codes_np[:1]).numpy().astype(np.int64),
        n_units=n_units,
    )


def code_path_profile(
    code_fn: Callable[[Tensor], Tensor], start: Float[Tensor, "d"], end: Float[Tensor, "d"], n_units: int, n_steps: int = 256
) -> PathProfile:
    """Profile of ``code_fn`` (points ``[n, d]`` -> packed codes ``[n, n_bytes]``) on the
    straight path from ``start`` to ``end``."""
    t, points = interpolate(start, end, n_steps)
    return path_profile(t, points, code_fn(points), n_units)


def residual_path_profile(
    model: HookedModel,
    layer: int,
    start: Float[Tensor, "d_model"],
    end: Float[Tensor, "d_model"],
    n_steps: int = 256,
    factors: Optional[Sequence[str]] = None,
) -> PathProfile:
    """Boundaries of layer ``layer``'s units crossed on the straight line between two
    residual vectors (read as ``hook_resid_mid``; see
    :func:`~bilinear_lens.activations.spline_codes.residual_codes`). Distance is in residual space."""
    n_units = code_layout(model, layer, factors).n_units
    return code_path_profile(lambda x: residual_codes(model, layer, x, factors), start, end, n_units, n_steps)


@torch.no_grad()
def embedding_path_profile(
    model: HookedModel,
    tokens: Int[Tensor, "pos"],
    position: int,
    token_a: int,
    token_b: int,
    layers: Layers = 0,
    n_steps: int = 256,
    factors: Optional[Sequence[str]] = None,
    batch_size: int = 256,
) -> PathProfile:
    """Walk the input embedding at ``position`` of the prompt ``tokens`` from token
    ``token_a``'s embedding to ``token_b``'s, and profile the spline code of ``layers``
    at that position. The walk substitutes ``hook_embed`` (positional embeddings are
    added after it), so every other position keeps its token. Distance is in embedding
    space."""
    if tokens.dim() != 1 or not 0 <= position < tokens.shape[0]:
        raise ValueError(f"tokens must be one sequence [pos] and position in range, got {tuple(tokens.shape)}, {position}")
    layout = code_layout(model, layers, factors)
    endpoints = tokens.repeat(2, 1)
    endpoints[0, position], endpoints[1, position] = token_a, token_b
    embeds = capture_activations(model, endpoints, ["hook_embed"])["hook_embed"][:, position]
    t, points = interpolate(embeds[0], embeds[1], n_steps)
    codes = []
    for start in range(0, points.shape[0], batch_size):
        chunk = points[start : start + batch_size]

        def substitute(value: Tensor, hook: Any, chunk: Tensor = chunk) -> Tensor:
            value = value.clone()
            value[:, position] = chunk.to(value.dtype)
            return value

        batch = tokens.repeat(chunk.shape[0], 1)
        acts = capture_activations(model, batch, layout.hook_names, [("hook_embed", substitute)])
        codes.append(codes_from_activations({k: v[:, position] for k, v in acts.items()}, layout))
    return path_profile(t, points, torch.cat(codes), layout.n_units)


# ---- purity --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PurityReport:
    """Purity of a clustering of labelled tokens, with the numbers that keep it honest.

    - ``purity``: ``sum_c max_l n(c, l) / N``; 1 for singleton clusters whatever the labels.
    - ``weighted_purity``: the same over clusters with at least ``min_size`` tokens only
      (size-weighted; ``covered_fraction`` of the tokens lie in them; NaN if none).
    - ``shuffled_purity`` / ``shuffled_weighted_purity``: expected values when the same
      labels are dealt at random to the same cluster sizes (mean of ``n_shuffles`` draws,
      each cluster's label counts from its multivariate hypergeometric marginal).
    - ``majority_rate``: the share of the most common label (purity of one big cluster).
    """

    n_tokens: int
    n_clusters: int
    purity: float
    shuffled_purity: float
    min_size: int
    n_clusters_min_size: int
    covered_fraction: float
    weighted_purity: float
    shuffled_weighted_purity: float
    majority_rate: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Contingency:
    """Per cluster: labelled tokens and the count of its majority label; per label: total."""

    sizes: np.ndarray
    majority: np.ndarray
    label_totals: np.ndarray

    @classmethod
    def from_pairs(cls, clusters: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> "_Contingency":
        """From distinct ``(cluster, label)`` pairs and their counts."""
        _, cluster_index = np.unique(clusters, return_inverse=True)
        _, label_index = np.unique(labels, return_inverse=True)
        n_clusters = int(cluster_index.max()) + 1 if counts.size else 0
        sizes = np.bincount(cluster_index, weights=counts, minlength=n_clusters).astype(np.int64)
        majority = np.zeros(n_clusters, dtype=np.int64)
        np.maximum.at(majority, cluster_index, counts)
        totals = np.bincount(label_index, weights=counts).astype(np.int64) if counts.size else np.zeros(0, np.int64)
        return cls(sizes, majority, totals)

    @classmethod
    def from_tokens(cls, clusters: ArrayLike, labels: ArrayLike) -> "_Contingency":
        """From one cluster id and one label per token (labels ``< 0`` are dropped)."""
        c, l = _numpy(clusters).reshape(-1), _numpy(labels).reshape(-1).astype(np.int64)
        if c.shape != l.shape:
            raise ValueError(f"got {c.size} cluster ids for {l.size} labels")
        c, l = c[l >= 0], l[l >= 0]
        pairs, counts = np.unique(np.stack([_dense(c), l]), axis=1, return_counts=True)
        return cls.from_pairs(pairs[0], pairs[1], counts)


def _dense(ids: np.ndarray) -> np.ndarray:
    """Any hashable ids (uint64 hashes included) -> int64 indices."""
    return np.unique(ids, return_inverse=True)[1].astype(np.int64)


def _report(table: _Contingency, min_size: int, n_shuffles: int, seed: int) -> PurityReport:
    n = int(table.sizes.sum())
    if n == 0:
        raise ValueError("purity needs at least one labelled token")
    big = table.sizes >= min_size
    covered = int(table.sizes[big].sum())
    shuffled_all, shuffled_big = _shuffled_majorities(table, big, n_shuffles, seed)
    return PurityReport(
        n_tokens=n,
        n_clusters=int(table.sizes.size),
        purity=float(table.majority.sum() / n),
        shuffled_purity=shuffled_all / n,
        min_size=min_size,
        n_clusters_min_size=int(big.sum()),
        covered_fraction=covered / n,
        weighted_purity=float(table.majority[big].sum() / covered) if covered else float("nan"),
        shuffled_weighted_purity=shuffled_big / covered if covered else float("nan"),
        majority_rate=float(table.label_totals.max() / n),
    )


def _shuffled_majorities(table: _Contingency, big: np.ndarray, n_shuffles: int, seed: int) -> tuple[float, float]:
    """Expected sum of majority counts over all clusters and over ``big`` ones, under
    random labels. Clusters of one size share a distribution, so they are drawn together."""
    rng = np.random.default_rng(seed)
    total_all = total_big = 0.0
    for size in np.unique(table.sizes):
        of_size = table.sizes == size
        n_all, n_big = int(of_size.sum()), int((of_size & big).sum())
        if size == 1:  # a singleton's majority is 1 whatever the labels
            total_all, total_big = total_all + n_all, total_big + n_big
            continue
        draws = [rng.multivariate_hypergeometric(table.label_totals, int(size), size=n_all).max(axis=1).sum() for _ in range(n_shuffles)]
        mean = float(np.mean(draws))
        total_all += mean
        total_big += mean * n_big / n_all
    return total_all, total_big


def purity(clusters: ArrayLike, labels: ArrayLike) -> float:
    """``sum over clusters of the majority label count / labelled tokens``."""
    table = _Contingency.from_tokens(clusters, labels)
    return float(table.majority.sum() / table.sizes.sum())


def purity_report(clusters: ArrayLike, labels: ArrayLike, min_size: int = 5, n_shuffles: int = 20, seed: int = 0) -> PurityReport:
    """:class:`PurityReport` of a clustering (one id per token) w.r.t. ``labels``."""
    return _report(_Contingency.from_tokens(clusters, labels), min_size, n_shuffles, seed)


@dataclass(frozen=True)
class PurityComparison:
    """Polytope regions vs k-means clusters of the same tokens, same ``k``."""

    k: int
    regions: PurityReport
    kmeans: PurityReport

    def as_dict(self) -> dict[str, Any]:
        return {"k": self.k, "regions": self.regions.as_dict(), "kmeans": self.kmeans.as_dict()}


def compare_purity(
    activations: Float[ArrayLike, "n d"],
    region_ids: ArrayLike,
    labels: Int[ArrayLike, "n"],
    k: Optional[int] = None,
    min_size: int = 5,
    normalize: bool = True,
    n_shuffles: int = 20,
    seed: int = 0,
) -> PurityComparison:
    """Purity of polytope regions vs k-means clusters of the activations.

    Only labelled tokens (``label >= 0``) take part. ``k`` defaults to the number of
    distinct regions among them, so both partitions have the same number of parts.
    ``normalize`` clusters unit-normalised activations, i.e. clusters of *directions*
    (Black et al.'s comparison).
    """
    acts, ids, labs = _numpy(activations), _numpy(region_ids).reshape(-1), _numpy(labels).reshape(-1)
    labelled = labs >= 0
    acts, ids, labs = acts[labelled], ids[labelled], labs[labelled]
    if acts.shape[0] == 0:
        raise ValueError("compare_purity needs at least one labelled token")
    if normalize:
        acts = acts / np.maximum(np.linalg.norm(acts, axis=1, keepdims=True), 1e-12)
    n_clusters = k if k is not None else int(np.unique(ids).size)
    assignment, _ = kmeans(acts, n_clusters, seed=seed)
    return PurityComparison(
        k=n_clusters,
        regions=purity_report(ids, labs, min_size, n_shuffles, seed),
        kmeans=purity_report(assignment, labs, min_size, n_shuffles, seed),
    )


def region_summary(tracker: RegionTracker, top: int = 10, render: Optional[Callable[[Any], str]] = None) -> dict[str, Any]:
    """JSON-ready summary of a tracker: counts, size stats, Hamming stats, top regions."""
    render = render or str
    return {
        "tokens": tracker.n_tokens,
        "distinct_regions": tracker.n_regions,
        "tokens_per_region": tracker.size_stats(),
        "hamming": tracker.hamming_stats(),
        "most_common": [
            {
                "region": f"{region:016x}",
                "count": count,
                "fraction": count / tracker.n_tokens,
                "examples": [render(e) for e in tracker.examples(region)],
            }
            for region, count in tracker.most_common(top)
        ],
    }

