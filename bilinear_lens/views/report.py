"""A self-contained, offline HTML report of one layer of a checkpoint.

``build_report(model, layer, tokens=..., texts=...)`` gathers, for the chosen layer:

1. the model's config and attention patterns on a sample text (circuitsvis);
2. for a bilinear layer and each output token ``t``: the eigenvalue spectrum of
   ``Q(u_t)`` (weights only), the input tokens at both poles of the top eigenvectors,
   the eigenvector activations ``lambda_i (v_i . x)^2`` on the sample texts (circuitsvis
   top-k tokens and token-level views), and how well the top-k components reproduce
   ``u_t . MLP(x)`` on those tokens (the paper's Figure 9 check);
3. the interaction sub-matrix ``F Q(u) F^T`` between chosen input tokens (for a logit
   difference such as ``" happy" - " sad"`` and inputs like ``" not"``, ``" happy"``);
4. the neurons whose single zero-ablation changes the loss most (hooks);
5. boundary density of the layer's spline code along an embedding path between two
   tokens (polytope lens).

Everything is inlined (circuitsvis bundle, figures as base64 PNG), so the page works
from disk with no network. ``write_report`` writes it atomically.
"""

from __future__ import annotations

import html
from functools import partial
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Int
from torch import Tensor

from bilinear_lens.activations.ablation import ablation_sweep
from bilinear_lens.activations.ablation.uncertainty import DEFAULT_FDR
from bilinear_lens.activations.eigen_readings import eigenvector_activations_on_tokens, rank_k_correlation_on_tokens
from bilinear_lens.weights.layer_eigen import (
    layer_eigendecomposition,
    normalized_embeddings,
    top_tokens_for_eigenvectors,
)
from bilinear_lens.activations.polytope import embedding_path_profile
from bilinear_lens.data.synthetic import synthetic_stories
from bilinear_lens.files.atomic import atomic_write_text
from bilinear_lens.models.hook_names import check_layer
from bilinear_lens.models.mlp_kinds import ATTN_ONLY, mlp_kind_spec
from bilinear_lens.models.protocol import HookedModel
from bilinear_lens.views import plots, viz
from bilinear_lens.weights.directions import logit_diff_direction, token_id
from bilinear_lens.weights.eigen import low_rank_error
from bilinear_lens.weights.tensor import interaction
from bilinear_lens.progress import progress_bar

DEFAULT_OUTPUT_TOKENS = (" happy", " sad")
DEFAULT_INPUT_TOKENS = (" not", " happy", " sad", " very", " was", " never", " good", " bad")


def _default_tokens(model: HookedModel, candidates: Sequence[str]) -> list[int]:
    """Ids of the *default* candidates that are one token of this vocabulary (a default that
    a tokenizer splits is skipped; tokens the caller names are never skipped: see
    :func:`_given_tokens`)."""
    ids = []
    for c in candidates:
        try:
            ids.append(token_id(model, c))
        except (ValueError, TypeError):
            continue
    return list(dict.fromkeys(ids))


def _given_tokens(model: HookedModel, tokens: Sequence[Union[str, int]], what: str) -> list[int]:
    """Ids of caller-named tokens, each exactly one token (else a ValueError naming it)."""
    ids = []
    for t in tokens:
        try:
            ids.append(token_id(model, t))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{what} {t!r}: {err}") from None
    return list(dict.fromkeys(ids))


def _name(model: HookedModel, tok: int) -> str:
    return model.tokenizer.decode([tok]) if getattr(model, "tokenizer", None) is not None else str(tok)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="bl-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _sample_tokens(model: HookedModel, texts: Sequence[str], max_len: int) -> list[torch.Tensor]:
    out = []
    for text in texts:
        toks = model.to_tokens(text)[0][:max_len]
        if toks.numel() >= 2:
            out.append(toks)
    if not out:
        raise ValueError("no sample text has at least 2 tokens")
    return out


def _equal_rows(tokens: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Cut the concatenated sample into unpadded rows of ``length`` tokens (for losses)."""
    flat = torch.cat(list(tokens))
    n = max(1, flat.numel() // length)
    return flat[: n * length].reshape(n, length) if flat.numel() >= length else flat[None]


@dataclass(frozen=True)
class _Sample:
    """The sample texts as the sections use them."""

    tokens: list[Tensor]  # one [pos] tensor per text (cut to n_ctx)
    rows: Int[Tensor, "n_rows pos"]  # unpadded equal-length rows, for losses and correlations
    str_tokens: list[list[str]]
    documents: Optional[Int[Tensor, "n_rows pos"]] = None  # each row token's document (None: rows are samples)


def _sample(model: HookedModel, texts: Optional[Sequence[str]], rows: Optional[Tensor] = None,
            documents: Optional[Tensor] = None) -> _Sample:
    if texts is None:
        texts = synthetic_stories(8, seed=1)
    samples = _sample_tokens(model, texts, max_len=model.cfg.n_ctx)
    if rows is None:
        rows = _equal_rows(samples, min(model.cfg.n_ctx, 32))
    str_tokens = [[_name(model, int(t)) for t in s] for s in samples]
    return _Sample(samples, rows, str_tokens, documents)


def _output_tokens(
    model: HookedModel, tokens: Optional[Sequence[Union[str, int]]], sample: _Sample, has_features: bool
) -> list[int]:
    """The caller's output tokens (each must be one token), else the defaults that are one
    token here, else (no default is, and no feature is asked for) the sample's two most
    frequent tokens."""
    if tokens is not None:
        return _given_tokens(model, tokens, "output token")
    out_ids = _default_tokens(model, DEFAULT_OUTPUT_TOKENS)
    if not out_ids and not has_features:
        counts = torch.bincount(torch.cat(sample.tokens), minlength=model.cfg.d_vocab)
        out_ids = counts.topk(2).indices.tolist()
    return out_ids


def _model_sections(model: HookedModel, layer: int, sample: _Sample) -> list[Any]:
    config_rows = [(k, v) for k, v in model.cfg.to_dict().items()]
    return [
        "<h2>Model</h2>" + _table(config_rows, ("field", "value")),
        f"<h2>Attention patterns, layer {layer}</h2>",
        viz.attention_view(model, sample.tokens[0][None], layer),
    ]


def _eigen_sections(model: HookedModel, layer: int, name: str, spec: Any, sample: _Sample, n_eigenvectors: int) -> list[Any]:
    """Spectrum, poles, activations on the sample and rank-k check of ``Q(u)`` for the output
    direction ``spec`` (a token id or a ``FeatureDirection``) called ``name``."""
    le = layer_eigendecomposition(model, layer, spec)
    errs = ", ".join(f"k={k}: {float(low_rank_error(le.eig, k)):.3f}" for k in (1, 2, 4, 8) if k <= le.eig.k)
    tops = top_tokens_for_eigenvectors(model, le, n_vectors=n_eigenvectors, n_tokens=8)
    poles = _table(
        [(t.index, f"{t.eigenvalue:+.3g}", " ".join(map(repr, t.positive_tokens)), " ".join(map(repr, t.negative_tokens)))
         for t in tops],
        ("eigenvector", "lambda", "+ pole (v . e largest)", "- pole (v . e smallest)"),
    )
    acts = [eigenvector_activations_on_tokens(model, s[None], le, n_eigenvectors)[0].numpy() for s in sample.tokens]
    labels = [f"λ{i}={v:+.3g}" for i, v in enumerate(le.eigenvalues[:n_eigenvectors].tolist())]
    corr = rank_k_correlation_on_tokens(model, sample.rows, le, ks=[k for k in (1, 2, 4, 8, 16) if k <= le.eig.k])
    return [
        f"<h2>Output {html.escape(name)}: eigendecomposition of Q(u), layer {layer}</h2>",
        f"<p>Fraction of ||Q||<sub>F</sub> missed by the rank-k approximation: {errs}</p>",
        plots.plot_eigenvalue_spectrum(le.eigenvalues.numpy(), title=f"Q(u) spectrum for {name}", top=32),
        "<h3>Input tokens at the poles of the top eigenvectors</h3>" + poles,
        "<h3>Eigenvector activations λ(v·x)² on sample texts</h3>",
        viz.eigenvector_top_tokens_view(acts, sample.str_tokens, labels=labels),
        viz.token_activations_view(sample.str_tokens, acts, labels=labels),
        plots.plot_rank_k_curve(list(corr), list(corr.values()), title=f"rank-k vs true u·MLP(x), {name}"),
    ]


def _interaction_sections(
    model: HookedModel,
    layer: int,
    pair: Optional[tuple[Union[str, int], Union[str, int]]],
    input_tokens: Optional[Sequence[Union[str, int]]],
) -> list[Any]:
    """The interaction sub-matrix between input tokens for the logit difference ``pair``."""
    in_ids = (_default_tokens(model, DEFAULT_INPUT_TOKENS) if input_tokens is None
              else _given_tokens(model, input_tokens, "input token"))
    if pair is None or len(in_ids) < 2:
        return []
    a, b = token_id(model, pair[0]), token_id(model, pair[1])
    F = normalized_embeddings(model, layer)[in_ids]
    sub = interaction(model.blocks[layer].mlp, logit_diff_direction(model, a, b), F, F)
    labels = [_name(model, i) for i in in_ids]
    return [
        f"<h2>Interactions for logit[{_name(model, a)!r}] − logit[{_name(model, b)!r}]</h2>",
        "<p>Entry (i, j) is f<sub>i</sub><sup>T</sup> Q(u) f<sub>j</sub> for normalised input-token "
        "embeddings: the diagonal is a token's own effect, off-diagonal entries how two tokens "
        "present together push the logit difference (e.g. negation flipping sentiment).</p>",
        plots.plot_interaction_heatmap(sub.numpy(), labels, labels, title="f_i^T Q(u) f_j"),
    ]


def _ablation_sections(model: HookedModel, layer: int, sample: _Sample, top: int) -> list[Any]:
    table = ablation_sweep(model, sample.rows, layer, progress=False, position=None, documents=sample.documents)
    clear = int((table["delta_loss_q"] < DEFAULT_FDR).sum())
    ranked = table.top(min(top, len(table)))
    rows = [(int(n), f"{d:+.5f}", f"{e:.5f}", f"{q:.3g}", "yes" if q < DEFAULT_FDR else "~0")
            for n, d, e, q in zip(ranked["neuron"].tolist(), ranked["delta_loss"].tolist(),
                                  ranked["delta_loss_se"].tolist(), ranked["delta_loss_q"].tolist())]
    n_clusters = table.uncertainty["n_clusters"]["loss"]
    unit = "documents" if table.uncertainty["clusters"] == "documents" else "rows"
    return [
        f"<h2>Single-neuron zero ablation, layer {layer} (hook_post)</h2>",
        f"<p>Clean loss {table.baseline['loss']:.4f} on {sample.rows.shape[0]} x {sample.rows.shape[1]} tokens "
        "(rows x positions, as <code>ablate</code> counts them). "
        f"{clear} of {len(table)} neurons change the loss distinguishably from zero (Benjamini-Hochberg "
        f"q &lt; {DEFAULT_FDR:g} over the layer's {len(table)} neurons; standard errors clustered by "
        f"{unit}, {n_clusters} of them); a ranking among the others is noise on this text.</p>",
        _table(rows, ("neuron", "Δ loss", "standard error", "q", "distinguishable")),
        plots.plot_ablation_effects(table.columns["delta_loss"].numpy(), top=top, title="Δ loss when zeroing one neuron"),
    ]


def _polytope_sections(model: HookedModel, layer: int, sample: _Sample, token_a: int, token_b: int) -> list[Any]:
    prompt = sample.tokens[0]
    profile = embedding_path_profile(model, prompt, len(prompt) - 1, token_a, token_b, layers=layer, n_steps=128)
    return [
        f"<h2>Polytope boundaries along an embedding path, layer {layer}</h2><p>The last token of the first sample "
        f"walks from {_name(model, token_a)!r} to {_name(model, token_b)!r}: "
        f"{profile.n_flips} unit flips over distance {profile.length:.3f} "
        f"({profile.flips_per_unit_distance:.1f} per unit).</p>",
        plots.plot_boundary_density(profile.t, profile.changes, title="code changes along the path"),
    ]


Job = tuple[str, Callable[[], list[Any]]]


def _mlp_jobs(model: HookedModel, layer: int, sample: _Sample, out_ids: list[int], options: dict[str, Any]) -> list[Job]:
    """The section builders about layer ``layer``'s MLP, as far as its kind allows, each
    with a label for the progress bar (run in order by :func:`build_report`)."""
    kind = model.cfg.mlp_kind
    if kind == ATTN_ONLY:
        return []
    spec = mlp_kind_spec(kind)
    jobs: list[Job] = []
    if spec.is_bilinear and not model.cfg.mlp_bias:
        directions = [(repr(_name(model, tok)), tok) for tok in out_ids] + [(f.label, f) for f in options["features"]]
        for name, direction in directions:
            jobs.append((f"eigen {name}", partial(_eigen_sections, model, layer, name, direction, sample,
                                                  options["n_eigenvectors"])))
        pair = options["logit_diff"]
        if pair is None and len(out_ids) >= 2:
            pair = (out_ids[0], out_ids[1])
        jobs.append(("interactions", partial(_interaction_sections, model, layer, pair, options["input_tokens"])))
    else:
        note = f"<p>Layer {layer} has a {kind!r} MLP: no interaction matrices (bilinear MLPs only).</p>"
        jobs.append(("interactions", lambda: [note]))
    jobs.append(("ablation", partial(_ablation_sections, model, layer, sample, options["ablation_top"])))
    if spec.code_factors and len(out_ids) >= 2:  # a kind with spline-code units
        jobs.append(("polytopes", partial(_polytope_sections, model, layer, sample, out_ids[0], out_ids[1])))
    return jobs


@torch.no_grad()
def build_report(
    model: HookedModel,
    layer: int = 0,
    tokens: Optional[Sequence[Union[str, int]]] = None,
    texts: Optional[Sequence[str]] = None,
    logit_diff: Optional[tuple[Union[str, int], Union[str, int]]] = None,
    input_tokens: Optional[Sequence[Union[str, int]]] = None,
    n_eigenvectors: int = 4,
    ablation_top: int = 20,
    title: Optional[str] = None,
    features: Sequence[Any] = (),
    progress: bool = True,
    text_label: Optional[str] = None,
    rows: Optional[Int[Tensor, "n_rows pos"]] = None,
    documents: Optional[Int[Tensor, "n_rows pos"]] = None,
) -> str:
    """The report's HTML (see module docstring). ``model`` is a
    :class:`~bilinear_lens.models.model.BilinearTransformer` with a tokenizer. ``tokens`` and
    ``input_tokens`` must each be one token (by default, common sentiment words that are);
    ``features`` (:class:`~bilinear_lens.weights.directions.FeatureDirection`) add an
    eigendecomposition section per SAE feature, as output tokens do. ``progress`` shows a
    progress bar over the sections. ``text_label`` says which text ``texts`` are (shown at
    the top; default: "the built-in synthetic stories" when ``texts`` is ``None``, else
    "the given texts"). ``rows`` (unpadded ``[n_rows, pos]`` token ids, e.g.
    :func:`~bilinear_lens.training.measured_text.measured_rows`' ``rows``) are what the
    losses and correlations (neuron ablation, rank-k check) are measured on, so the page
    shows the numbers ``bilinear-lens ablate`` prints on the same rows; default: ``texts``
    cut into rows of min(n_ctx, 32) tokens. ``documents`` (``rows``' document ids, e.g.
    ``measured_rows``' ``document_ids``) cluster the ablation's standard errors by document
    (default: rows are the samples)."""
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("the report needs a model with a tokenizer (to show tokens)")
    check_layer(model, layer)
    for name, value in (("n_eigenvectors", n_eigenvectors), ("ablation_top", ablation_top)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if n_eigenvectors > model.cfg.d_model:  # Q(u) has d_model eigenvectors
        raise ValueError(f"n_eigenvectors (--n-eigenvectors) must be in [1, {model.cfg.d_model}] (d_model: the "
                         f"eigenvectors Q(u) has), got {n_eigenvectors}")
    sample = _sample(model, texts, rows, documents)
    out_ids = _output_tokens(model, tokens, sample, has_features=bool(features))
    options = dict(n_eigenvectors=n_eigenvectors, logit_diff=logit_diff, input_tokens=input_tokens,
                   ablation_top=ablation_top, features=list(features))
    jobs = [("model", partial(_model_sections, model, layer, sample))] + _mlp_jobs(model, layer, sample, out_ids, options)
    label = text_label or ("the built-in synthetic stories (seed 1)" if texts is None else "the given texts")
    sections: list[Any] = [f'<p class="bl-measured-on">Measured on {html.escape(label)}.</p>']
    bar = progress_bar(jobs, desc="report", unit="section", enabled=progress, every_item=True)  # few, slow sections
    for label, job in bar:
        bar.set_postfix_str(label)
        sections += job()
    style = (
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        ".bl-table{border-collapse:collapse}.bl-table td,.bl-table th{border:1px solid #ccc;padding:2px 6px}</style>"
    )
    page = viz.html_page(sections, title=title or f"bilinear-lens report: layer {layer}")
    return page.replace("</head>", style + "\n</head>", 1)


def _check_file_path(path: Path) -> None:
    """``ValueError`` unless ``path`` can be written as a file: not a directory, and no parent
    is a regular file (the rename or mkdir would otherwise fail with a raw OSError)."""
    if path.is_dir():
        raise ValueError(f"report path {path} is a directory; give the HTML file to write")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"report path {path}: {parent} is a file, not a directory")
            return


def write_report(model: HookedModel, path: Union[str, Path], **kwargs: Any) -> Path:
    """Build the report and write it to ``path`` atomically (temp file + rename). A ``path``
    that is a directory, or under a regular file, is a ``ValueError`` naming it (checked
    before the report is built)."""
    _check_file_path(Path(path))
    page = build_report(model, **kwargs)
    return atomic_write_text(path, page)  # mode follows the umask, like an ordinary file
