"""``bilinear-lens polytope``: polytope-region statistics of an MLP layer over a text.

    bilinear-lens polytope --checkpoint runs/tiny/final --layer 0          # the model's own val text
    bilinear-lens polytope --checkpoint runs/tiny/final --layer 0 --text-file training/sample_stories.txt

Without ``--text-file`` it measures what ``ablate`` and ``report`` measure: the model's own
training data as its checkpoint records it, the validation documents of that corpus
(:func:`~bilinear_lens.training.measured_text.measured_text`; enough of them for
``--max-tokens``), or synthetic stories, said so, when the checkpoint records none. The first
output line names the text.

Prints the number of tokens and distinct regions (spline codes, see
:mod:`bilinear_lens.activations.spline_codes`), tokens-per-region statistics, the most common regions
with example contexts, the mean Hamming distance between sampled tokens' codes and, when
tokens carry labels (word classes of the synthetic vocabulary by default), the purity of
regions vs k-means clusters (:func:`bilinear_lens.activations.polytope.compare_purity`). ``--json``
prints the same as one JSON object. BOS/padding tokens are not counted.

The text file's documents (``--documents``, training's rule) are packed the way training
and ``ablate`` pack them: each document preceded by BOS, all concatenated and cut into rows
of n_ctx tokens (no BOS per row, no padding). Only the first ``--max-tokens`` text tokens
are run. A row that starts mid-document has no context for its first tokens, so its first
``--warmup`` positions (up to its first BOS) are not counted: without that, identical
tokens at row starts share a region and fill the most-common table. The output says how
many tokens were read, cut by ``--max-tokens``, skipped this way, and counted.

Purity counts labelled tokens only: with word-class labels, only tokens of the synthetic
vocabulary's word classes carry one, so the purity rows (``labelled``) can hold fewer tokens
than the text. k-means runs on a sample of at most ``--purity-tokens`` labelled tokens with
``k`` = as many clusters as the sample has regions, but at most one per ``--min-size``
labelled tokens (:func:`default_k`), so clusters average at least ``--min-size`` tokens: on
a short text, k = number of tokens would make every purity 1 by construction. With fewer
than ``2 x --min-size`` labelled tokens in the sample, the k-means comparison is skipped;
when no region holds ``--min-size`` labelled tokens, a warning says region purity is not
evidence (tiny regions are pure whatever the labels; compare the ``shuffled`` columns).

At realistic width the code has ``2^n_units`` possible regions and (nearly) every token gets
one of its own (measured: 18,837 regions for 18,840 tokens at d_mlp 2048), so region counts
and region purity say nothing and more text does not change that. When regions reach
:data:`DEGENERATE_REGION_FRACTION` of the counted tokens and the code could hold one region
per token, a warning says so and names the measures that stay meaningful:

- ``--units K``: codes on a seeded (``--seed``) random subset of K units of EACH layer
  (:func:`~bilinear_lens.activations.code_subsets.choose_units`; every factor of a layer,
  e.g. both of a bilinear layer, uses the same K units), so a code has ``K x factors x
  layers`` bits and at most that power of 2 regions. The JSON's ``units`` lists them.
  ``--units d_mlp`` gives the default result.
- Hamming neighbourhoods (``hamming_neighbours``): for the sampled tokens (the same
  reservoir as the mean Hamming distance), the mean/median distance to the nearest other
  sampled token's code, the fraction with one within ``--hamming-radius`` units (default 1%
  of the code's units, at least 1) and the fraction sharing a region with another.
- ``--kmeans K``: k-means with K clusters on the codes of the sampled tokens (the first
  ``--purity-tokens`` counted tokens; :func:`~bilinear_lens.activations.code_clusters.cluster_codes`).
  On 0/1 codes squared distance is Hamming distance, and tokens of one region always share a
  cluster, so the clusters are K unions of regions whatever the width. The output gives their
  sizes, the mean Hamming distance from a token to its cluster's majority code (next to the
  same for one cluster: how much tighter K clusters are than the whole sample) and, with
  labels, their label purity against its shuffled chance level (a row of the purity table).
  K must be at most ``--purity-tokens``; a text with fewer sampled tokens than K skips it
  with a warning. Without ``--k``, the k-means on activations of the purity section then
  uses the same K, so its row and the code row compare codes with directions like for like
  (the polytope lens' claim: regions, here unions of nearby regions, are purer).
- The k-means comparison of the purity section (``--labels``), which clusters activations
  rather than codes.

Advice to read more text is given only where it helps: "raise --max-tokens (N tokens were
cut)" when the cap cut the text, "give a longer --text-file" otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from typing import Any, Optional

import numpy as np

from bilinear_lens.commands.common import (
    UsageError,
    add_device_args,
    analysis_parser,
    load_model_with_tokenizer,
    place_model,
    add_documents_argument,
    read_documents,
    read_text_file,
    report_error,
    require_non_negative,
    require_positive,
    warn_special_token_text,
)
from bilinear_lens.data.documents import resolve_document_rule
from bilinear_lens.data.packing import pack_documents
from bilinear_lens.models.hook_names import mlp_hook_name
from bilinear_lens.activations.polytope import (
    compare_purity,
    decode_context,
    region_summary,
    track_regions,
    word_class_labels,
)
from bilinear_lens.activations.code_clusters import cluster_codes
from bilinear_lens.activations.code_subsets import choose_units, default_radius, nearest_neighbour_hamming, subset_layout
from bilinear_lens.activations.polytope import purity_report
from bilinear_lens.activations.spline_codes import CODE_FACTORS, code_layout
from bilinear_lens.models.protocol import HookedModel

LABEL_KINDS = ("auto", "word-class", "token", "none")

# Regions >= this fraction of counted tokens: (nearly) every token is its own region, so the
# region counts measure the text's length rather than the layer's partition. 0.9 leaves room
# for the few repeated contexts (a token after the same n-gram) that share a region at any width.
DEGENERATE_REGION_FRACTION = 0.9


def build_parser() -> argparse.ArgumentParser:
    parser = analysis_parser("polytope", __doc__)
    parser.add_argument("--layer", type=int, nargs="+", default=[0], help="layer(s); several layers make one joint code")
    parser.add_argument("--text-file", help="UTF-8 text file of documents (default: the model's own training data, "
                        "its val split, as its checkpoint records it; synthetic stories when it records none)")
    add_documents_argument(parser)
    parser.add_argument("--max-tokens", type=int, default=20_000,
                        help="run at most this many text tokens (BOS not counted; default 20000); the output says "
                        "when this cut the text")
    parser.add_argument("--warmup", type=int, default=8,
                        help="positions not counted at the start of each row that starts mid-document (they lack "
                        "context; default 8, 0: count all)")
    parser.add_argument("--factors", nargs="+", choices=CODE_FACTORS, help="MLP hooks whose signs make the code (default: per MLP kind)")
    parser.add_argument("--labels", choices=LABEL_KINDS, default="auto",
                        help="token labels for purity (default auto: word-class for a model trained on the synthetic "
                             "stories or with no training record, else token)")
    parser.add_argument("--top", type=int, default=10, help="most common regions to show (>= 1, default 10)")
    parser.add_argument("--examples", type=int, default=3, help="example contexts kept per region (0: none; default 3)")
    parser.add_argument("--context", type=int, default=8, help="tokens of context per example")
    parser.add_argument("--purity-tokens", type=int, default=2000, help="tokens sampled for k-means (default 2000)")
    parser.add_argument("--k", type=int, default=None,
                        help="k-means clusters on activations (default: --kmeans K when given, else as many as regions "
                        "in the sample, at most one per --min-size labelled tokens)")
    parser.add_argument("--min-size", type=int, default=5,
                        help="clusters of at least this many tokens count in weighted purity (default 5)")
    parser.add_argument("--units", type=int, default=None,
                        help="make codes from a seeded random subset of this many units of EACH layer (the same "
                        "units for each factor of a layer; default: all d_mlp units); coarser regions, so counts stay "
                        "meaningful at realistic width; the JSON lists the units")
    parser.add_argument("--kmeans", type=int, default=None, metavar="K",
                        help="k-means with K clusters on the sampled tokens' codes (the --purity-tokens sample; "
                        "Hamming distance): cluster sizes, distance to each cluster's majority code and, with labels, "
                        "label purity; meaningful at any width (K <= --purity-tokens)")
    parser.add_argument("--hamming-radius", type=int, default=None,
                        help="Hamming radius of a 'neighbour' for the nearest-neighbour measure (default: 1%% of the "
                        "code's units, at least 1)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samples, k-means and label shuffles (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    add_device_args(parser)
    parser.epilog = textwrap.fill(
        "purity table columns: labelled = labelled tokens; clusters = regions (or k-means clusters); purity = share "
        "of tokens carrying their cluster's majority label; shuffled = the same for randomly permuted labels "
        "(chance level, same cluster sizes); w>=N = purity over clusters of at least N = --min-size tokens only, "
        "size-weighted (next 'shuffled': its chance level); covered = fraction of the labelled tokens in those "
        "clusters.")
    return parser


# Default text: documents read for --max-tokens; stories hold more than this many tokens each
# (synthetic ~60-100, TinyStories ~200), so the cap, not the document count, ends the text.
MIN_TOKENS_PER_DOCUMENT = 16


def measured_documents(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    """``(documents, text)``: ``--text-file``'s documents (``--documents`` rule), or the
    model's own (:func:`~bilinear_lens.commands.measured_text.measured_text`), and the JSON's
    ``text`` record saying which (``origin``, ``source``, ``split``, ``rule``, ``note``...)."""
    from bilinear_lens.commands.measured_text import measured_text

    if args.text_file is not None:
        from bilinear_lens.training.measured_text import training_file_note

        documents = read_documents(args.text_file, rule=args.documents)
        rule = resolve_document_rule(read_text_file(args.text_file), args.documents)
        return documents, {"origin": "text-file", "source": args.text_file, "documents": args.documents,
                           "rule": rule, "documents_in_file": len(documents),
                           "note": training_file_note(args.text_file, args.checkpoint, documents, rule)
                           if args.checkpoint is not None else None}
    if args.documents != "auto":
        raise UsageError(f"--documents {args.documents} applies to --text-file only; without it the model's own "
                         "training data is split as its run recorded (data.documents); give --text-file too")
    count = max(32, -(-args.max_tokens // MIN_TOKENS_PER_DOCUMENT))
    text = measured_text(None, args.checkpoint, count, seed=args.seed, fallback_n_texts=count)
    documents = list(text.texts)
    return documents, {**text.to_dict(len(documents)), "rule": text.documents, "documents_in_file": None,
                       "description": text.describe(len(documents))}


def _token_rows(
    model: HookedModel, documents: list[str], max_tokens: int, warmup: int, where: str
) -> tuple[Any, Any, dict[str, int]]:
    """``(rows, mask, counts)``: ``documents`` packed by the one packing rule
    (:func:`~bilinear_lens.data.packing.pack_documents`: rows of n_ctx tokens, one shorter row
    if the text is shorter), the mask of positions to count, and how many text tokens were
    read, cut by ``max_tokens``, skipped at row starts and counted. ``where`` names the text."""
    try:
        packed = pack_documents(model.tokenizer, documents, model.cfg.n_ctx, max_tokens, warmup)
    except ValueError as err:
        raise UsageError(f"{where} has no tokens") from err
    return packed.rows, packed.mask, packed.counts


def resolve_label_kind(kind: str, checkpoint: str) -> str:
    """``kind``, or for ``"auto"``: ``"word-class"`` when the checkpoint was trained on the
    synthetic stories (whose vocabulary the word classes describe) or records no training
    data, else ``"token"`` (word classes would label almost no token of real text)."""
    if kind != "auto":
        return kind
    from bilinear_lens.commands.measured_text import recorded_data

    data = recorded_data(checkpoint)
    return "word-class" if data is None or data.source == "synthetic" else "token"


def _token_labels(model: HookedModel, kind: str) -> tuple[Optional[np.ndarray], list[str]]:
    if kind == "word-class":
        return word_class_labels(model.tokenizer, model.cfg.d_vocab)
    if kind == "token":
        return np.arange(model.cfg.d_vocab), []
    return None, []


def analyse(args: argparse.Namespace) -> dict[str, Any]:
    """Run the analysis; everything the command prints, as a JSON-ready dict."""
    require_positive(args, "max_tokens", "batch_size", "context", "top", "k", "purity_tokens", "min_size", "kmeans")
    if args.kmeans is not None and args.kmeans > args.purity_tokens:
        raise UsageError(f"--kmeans must be at most --purity-tokens {args.purity_tokens} (the sampled tokens it "
                         f"clusters), got {args.kmeans}")
    require_non_negative(args, "examples", "warmup", "seed", "hamming_radius")
    if args.seed >= 2**32:  # numpy's generators (samples, k-means) take seeds below 2**32
        raise UsageError(f"--seed must be < 2**32 = {2**32}, got {args.seed}")
    model = place_model(load_model_with_tokenizer(args.checkpoint, "polytope"), args)
    try:
        layout = code_layout(model, args.layer, args.factors)
    except (ValueError, KeyError) as err:  # bad layer, MLP kind without units, factor the kind lacks
        raise UsageError(str(err)) from err
    chosen_units = _chosen_units(args, model)
    code_units = None if chosen_units is None else {name: chosen_units[_hook_layer(name)] for name in layout.hook_names}
    kept_layout = layout if code_units is None else subset_layout(layout, code_units)
    documents, text = measured_documents(args)
    where = f"text file {args.text_file}" if args.text_file is not None else "the measured text"
    rows, mask, counts = _token_rows(model, documents, args.max_tokens, args.warmup, where)
    warn_special_token_text(model.tokenizer, args.text_file, "polytope", args.documents)
    args.labels = resolve_label_kind(args.labels, args.checkpoint)
    tok = model.tokenizer
    special = {i for i in (tok.bos_token_id, tok.pad_token_id) if i is not None}
    labels, label_names = _token_labels(model, args.labels)
    sample_hook = mlp_hook_name(args.layer[0], "hook_in")
    tracker, sample = track_regions(
        model,
        rows.split(args.batch_size),
        args.layer,
        args.factors,
        ignore_tokens=sorted(special),
        token_labels=labels,
        examples_per_region=args.examples,
        context_width=args.context,
        sample_hook=sample_hook if labels is not None or args.kmeans is not None else None,
        sample_size=args.purity_tokens,
        seed=args.seed,
        progress=not args.quiet,
        masks=mask.split(args.batch_size),
        code_units=code_units,
    )
    result: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "text": {**text, "labels": args.labels},
        "mlp_kind": model.cfg.mlp_kind,
        "layers": list(args.layer),
        "hooks": layout.hook_names,
        "n_units": kept_layout.n_units,
        "code_bytes": kept_layout.n_bytes,
        "units": None if code_units is None else {
            "per_layer": args.units, "seed": args.seed,
            "layers": {str(layer): units.tolist() for layer, units in chosen_units.items()},
        },
        **counts,
    }
    result.update(region_summary(tracker, args.top, render=lambda w: decode_context(tok, w)))
    radius = args.hamming_radius if args.hamming_radius is not None else default_radius(kept_layout.n_units)
    result["hamming_neighbours"] = nearest_neighbour_hamming(tracker.code_sample(), radius, kept_layout.n_units)
    degenerate = is_degenerate(result["distinct_regions"], result["tokens"], kept_layout.n_units)
    result["warnings"] = region_warnings(
        result["distinct_regions"], result["tokens"], kept_layout.n_units, counts["tokens_beyond_max"])
    result["purity"] = _purity(args, tracker, sample, labels, label_names, sample_hook, counts, degenerate)
    result["code_clusters"] = _code_clusters(args, sample, labels, kept_layout.n_units, counts, result["warnings"])
    return result


def _chosen_units(args: argparse.Namespace, model: HookedModel) -> Optional[dict[int, np.ndarray]]:
    """``--units``: ``{layer: units}`` (:func:`~bilinear_lens.activations.code_subsets.choose_units`,
    ``--seed``); every factor of a layer uses its layer's units. ``None`` without ``--units``."""
    if args.units is None:
        return None
    try:
        return choose_units(args.layer, model.cfg.d_mlp, args.units, seed=args.seed)
    except ValueError:
        raise UsageError(f"--units must be between 1 and d_mlp={model.cfg.d_mlp}, got {args.units}") from None


def _hook_layer(hook_name: str) -> int:
    """The layer of ``blocks.{layer}.mlp.hook_*``."""
    return int(hook_name.split(".")[1])


def is_degenerate(n_regions: int, n_tokens: int, n_units: int) -> bool:
    """(Nearly) every token its own region *because of the width*: regions >=
    :data:`DEGENERATE_REGION_FRACTION` x tokens while the code could give each token its own
    region (``2^n_units > n_tokens``; otherwise the regions are few and the text is short)."""
    if n_tokens <= 0 or n_regions < DEGENERATE_REGION_FRACTION * n_tokens:
        return False
    return 2**n_units > n_tokens


def more_text_advice(tokens_beyond_max: int) -> str:
    """What to do when a count needs more text: raise the cap when it cut the text, else a longer file."""
    if tokens_beyond_max > 0:
        return f"raise --max-tokens ({tokens_beyond_max} tokens were cut)"
    return "give a longer --text-file"


WIDTH_ADVICE = (
    "more text will not change this; measures that stay meaningful: --units K (codes on K random units per layer, "
    "coarser regions), the Hamming neighbourhoods (nearest sampled code, --hamming-radius), --kmeans K (k-means "
    "on the codes: K clusters of nearby codes, with label purity) and the k-means purity comparison (--labels)")


def region_warnings(n_regions: int, n_tokens: int, n_units: int, tokens_beyond_max: int) -> list[str]:
    """Warnings about the region counts themselves (see :func:`is_degenerate`)."""
    if not (n_tokens > 0 and n_regions >= DEGENERATE_REGION_FRACTION * n_tokens):
        return []
    share = f"{n_regions} regions for {n_tokens} counted tokens"
    if is_degenerate(n_regions, n_tokens, n_units):
        return [f"every token is (nearly) its own region ({share}): the code has {n_units} units (2^{n_units} "
                f"possible regions), so {WIDTH_ADVICE}"]
    return [f"nearly every token is its own region ({share}) because the text is short for the "
            f"2^{n_units} possible regions; {more_text_advice(tokens_beyond_max)}"]


def default_k(n_labelled: int, n_regions: int, min_size: int) -> int:
    """k-means clusters for ``n_labelled`` sampled tokens in ``n_regions`` regions: as many
    as regions (the like-for-like comparison), but at most ``n_labelled // min_size`` so a
    cluster holds ``min_size`` tokens on average; at least 1."""
    return max(1, min(n_regions, n_labelled // min_size))


def _purity(
    args: argparse.Namespace, tracker: Any, sample: Any, labels: Any, label_names: list[str], hook: str,
    counts: dict[str, int], degenerate: bool = False,
) -> Optional[dict[str, Any]]:
    """Purity of the labelled tokens (see module docstring); ``None`` without labelled tokens."""
    if labels is None or not tracker.label_counts:
        return None
    all_labelled = tracker.purity_report(args.min_size, seed=args.seed)
    out: dict[str, Any] = {
        "labels": args.labels,
        "label_names": label_names,
        "n_tokens": tracker.n_tokens,
        "n_labelled": all_labelled.n_tokens,
        "all_labelled": all_labelled.as_dict(),
        "kmeans_hook": hook,
        "warnings": [],
    }
    sample_labels = labels[sample.token_ids]
    labelled = sample_labels >= 0
    n_sample = int(labelled.sum())
    if all_labelled.n_clusters_min_size == 0:
        out["warnings"].append(
            f"no region holds --min-size {args.min_size} or more labelled tokens ({all_labelled.n_tokens} labelled "
            f"tokens in {all_labelled.n_clusters} regions): region purity is inflated by tiny regions, not evidence "
            "(compare 'shuffled'); "
            + ("at this width every token is nearly its own region: use --units K or --kmeans K" if degenerate
               else more_text_advice(counts["tokens_beyond_max"])))
    if n_sample < 2 * args.min_size:
        out["warnings"].append(
            f"k-means comparison skipped: the sample holds {n_sample} labelled tokens, fewer than "
            f"2 x --min-size {args.min_size}; "
            + more_text_advice(counts["tokens_beyond_max"]))
        return out
    n_regions = int(np.unique(np.asarray(sample.region_ids)[labelled]).size)
    # with --kmeans, the activation clusters take the same K: codes vs directions, like for like
    k = args.k if args.k is not None else args.kmeans if args.kmeans is not None else default_k(
        n_sample, n_regions, args.min_size)
    comparison = compare_purity(sample.activations, sample.region_ids, sample_labels, k, args.min_size, seed=args.seed)
    out["sample"] = comparison.as_dict()
    return out


def _code_clusters(
    args: argparse.Namespace, sample: Any, labels: Optional[np.ndarray], n_units: int, counts: dict[str, int],
    warnings: list[str],
) -> Optional[dict[str, Any]]:
    """``--kmeans K``: k-means on the sampled tokens' codes (see the module docstring), or
    ``None`` (not asked, or skipped with a warning appended to ``warnings``)."""
    if args.kmeans is None:
        return None
    n_sample = 0 if sample is None else int(sample.token_ids.size)
    if n_sample < args.kmeans:
        warnings.append(f"k-means on codes skipped: the sample holds {n_sample} tokens, fewer than --kmeans "
                        f"{args.kmeans}; lower --kmeans or {more_text_advice(counts['tokens_beyond_max'])}")
        return None
    clusters = cluster_codes(sample.codes, n_units, args.kmeans, seed=args.seed)
    out = clusters.as_dict()
    out["regions_in_sample"] = int(np.unique(sample.region_ids).size)
    out["mean_distance_to_centre_one_cluster"] = cluster_codes(sample.codes, n_units, 1).mean_distance_to_centre
    token_labels = None if labels is None else labels[sample.token_ids]
    labelled = 0 if token_labels is None else int((token_labels >= 0).sum())
    out["purity"] = (purity_report(clusters.assignment, token_labels, args.min_size, seed=args.seed).as_dict()
                     if labelled else None)
    if clusters.n_tokens < args.min_size * clusters.n_clusters:
        warnings.append(
            f"k-means on codes: {clusters.n_clusters} clusters for {clusters.n_tokens} sampled tokens average fewer "
            f"than --min-size {args.min_size}, so their purity is inflated by small clusters (compare 'shuffled'); "
            "lower --kmeans or raise --purity-tokens")
    return out


def _fmt(x: float) -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else f"{x:.3f}"


def _text_phrase(text: dict[str, Any]) -> str:
    """``--text-file F, documents: RULE (--documents R), N documents`` or the measured text's own
    description (``the model's training data (val split of F, ...), N documents``)."""
    if text["origin"] != "text-file":
        return text["description"]
    n_docs = text["documents_in_file"]
    return (f"--text-file {text['source']}, documents: {text['rule']}"
            + (f" (--documents {text['documents']})" if text["documents"] != text["rule"] else "")
            + f", {n_docs} document{'s' if n_docs != 1 else ''}"
            + (f" [{text['note']}]" if text.get("note") else ""))


def format_report(result: dict[str, Any]) -> str:
    """The human-readable tables."""
    sizes, ham, near = result["tokens_per_region"], result["hamming"], result["hamming_neighbours"]
    units = result["units"]
    lines = [
        f"measured on {_text_phrase(result['text'])}; labels: {result['text']['labels']}",
        f"polytope regions of {', '.join(result['hooks'])} ({result['mlp_kind']}): {result['n_units']} units"
        + (f" (--units {units['per_layer']} random units per layer, seed {units['seed']})" if units else "")
        + f", {result['code_bytes']} bytes per code",
        f"  tokens                 {result['tokens']} counted of {result['tokens_read']} read"
        + (f"; {result['tokens_beyond_max']} beyond --max-tokens {result['max_tokens']} not run (capped)"
           if result["tokens_beyond_max"] else "")
        + f"; {result['tokens_skipped_row_start']} skipped (first --warmup {result['warmup']} positions of rows "
        "starting mid-document)",
        f"  distinct regions       {result['distinct_regions']}",
        f"  tokens per region      mean {sizes['mean']:.2f}, median {sizes['median']:g}, max {sizes['max']}",
        f"  singleton regions      {sizes['singleton_regions']} ({100 * sizes['tokens_in_singletons']:.1f}% of tokens)",
        f"  mean Hamming distance  {_fmt(ham['mean'])} units"
        + (f" ({100 * ham['mean_fraction']:.1f}% of units)" if "mean_fraction" in ham else "")
        + f", over {ham['n_sampled']} sampled tokens",
        f"  nearest sampled code   mean {_fmt(near['mean'])}, median {_fmt(near['median'])} units away; "
        f"{_fmt(near['within_radius'])} of sampled tokens have one within --hamming-radius {near['radius']}, "
        f"{_fmt(near['same_region'])} in their region",
        *_code_cluster_lines(result["code_clusters"]),
        *[f"  warning: {w}" for w in result["warnings"]],
        "",
        "most common regions",
        f"  {'#':>3}  {'region':<16}  {'tokens':>6}  {'share':>6}  examples",
    ]
    for i, region in enumerate(result["most_common"], 1):
        examples = " | ".join(e.replace("\n", "\\n") for e in region["examples"])
        lines.append(f"  {i:>3}  {region['region']:<16}  {region['count']:>6}  {100 * region['fraction']:>5.1f}%  {examples}")
    purity = result["purity"]
    if purity is None:
        lines += ["", "purity: no labelled tokens (use --labels token, or text in the synthetic vocabulary)"]
        return "\n".join(lines)
    rows = [("regions, all labelled", purity["all_labelled"])]
    if "sample" in purity:
        rows += [("regions, sample", purity["sample"]["regions"]), ("k-means, sample", purity["sample"]["kmeans"])]
    if (result["code_clusters"] or {}).get("purity"):
        rows.append((f"k-means codes, k={result['code_clusters']['k']}", result["code_clusters"]["purity"]))
    min_size = purity["all_labelled"]["min_size"]
    lines += [
        "",
        f"purity w.r.t. {purity['labels']} labels: {purity['n_labelled']} of the {purity['n_tokens']} tokens carry one"
        + (f"; k-means on unit-normalised {purity['kmeans_hook']}, k = {purity['sample']['k']}" if "sample" in purity else ""),
        f"  {'':<22} {'labelled':>8} {'clusters':>8} {'purity':>7} {'shuffled':>8} "
        f"{f'w>={min_size}':>7} {'shuffled':>8} {'covered':>7}",
    ]
    for name, r in rows:
        lines.append(
            f"  {name:<22} {r['n_tokens']:>8} {r['n_clusters']:>8} {_fmt(r['purity']):>7} {_fmt(r['shuffled_purity']):>8} "
            f"{_fmt(r['weighted_purity']):>7} {_fmt(r['shuffled_weighted_purity']):>8} {_fmt(r['covered_fraction']):>7}"
        )
    lines.append(f"  majority-class rate    {_fmt(purity['all_labelled']['majority_rate'])}")
    lines.append(f"  (w>={min_size}: size-weighted purity of the regions or k-means groups "
                 f"with >= {min_size} (--min-size) tokens; covered: share of labelled tokens in them; see --help)")
    lines += [f"  warning: {w}" for w in purity["warnings"]]
    return "\n".join(lines)


def _code_cluster_lines(clusters: Optional[dict[str, Any]]) -> list[str]:
    """The ``--kmeans`` lines of the region table (none without ``--kmeans``)."""
    if clusters is None:
        return []
    sizes = clusters["tokens_per_cluster"]
    return [
        f"  k-means on codes       {clusters['n_clusters']} clusters (--kmeans {clusters['k']}) of {clusters['n_tokens']} "
        f"sampled tokens in {clusters['regions_in_sample']} regions; tokens per cluster mean {sizes['mean']:.2f}, "
        f"median {sizes['median']:g}, max {sizes['max']}, {sizes['singleton_clusters']} singletons",
        f"  distance to centre     mean {_fmt(clusters['mean_distance_to_centre'])} units from a token's code to its "
        f"cluster's majority code ({100 * clusters['mean_fraction_to_centre']:.1f}% of units); one cluster: "
        f"{_fmt(clusters['mean_distance_to_centre_one_cluster'])}",
    ]


def _json_safe(value: Any) -> Any:
    """NaN -> null (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = analyse(args)
    except UsageError as err:
        return report_error("polytope", err)
    if args.json:
        for warning in [*result["warnings"], *(result["purity"] or {}).get("warnings", [])]:
            print(f"bilinear-lens polytope: warning: {warning}", file=sys.stderr)
    print(json.dumps(_json_safe(result), indent=2) if args.json else format_report(result))
    return 0
