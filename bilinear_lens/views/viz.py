"""circuitsvis views of eigenvectors, neurons and attention, plus offline HTML embedding.

Every view returns circuitsvis' ``RenderedHTML``: the last expression of a Jupyter cell
displays it. Inputs are plain tensors / arrays and token strings, so the views work with
any analysis (eigendecompositions, ablations, raw hooks).

**Token text.** circuitsvis inserts token strings as *HTML* (``dangerouslySetInnerHTML``),
so a token like ``"<b"`` or ``"</script>"`` would be parsed as markup; the views here
escape ``& < >`` in tokens so they display literally.

**Offline HTML.** ``str(view)`` / ``view.show_code()`` is the *CDN* source: a module
script importing ``https://unpkg.com/circuitsvis@<version>/dist/cdn/esm.js``, so it is
blank offline. ``view.local_src`` inlines the package's ``circuitsvis/dist/cdn/iife.js``
(~1.3 MB, defines the global ``CircuitsVis``) in *every* view. Use :func:`view_to_html`
(one self-contained snippet) or ``view_to_html(view, include_bundle=False)`` plus one
:func:`circuitsvis_bundle_script` per page (see :func:`html_page`). Both also fix
circuitsvis' ``<div .../>`` mount point: HTML has no self-closing ``div``, so everything
after it nests inside and React's ``createRoot(div).render`` wipes it out.
"""

from __future__ import annotations

import html as _html
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch
from circuitsvis.activations import text_neuron_activations
from circuitsvis.attention import attention_heads, attention_patterns
from circuitsvis.tokens import colored_tokens
from circuitsvis.topk_tokens import topk_tokens
from circuitsvis.utils.render import RenderedHTML
from jaxtyping import Float
from torch import Tensor
from transformer_lens.utilities import get_act_name

from bilinear_lens.activations.capture import capture_activations
from bilinear_lens.models.hook_names import check_layer
from bilinear_lens.views.plots import as_array  # one converter for views and figures

ArrayLike = Union[Tensor, np.ndarray, Sequence[float], Sequence[Sequence[float]]]

__all__ = [
    "attention_view",
    "circuitsvis_bundle_script",
    "colored_tokens_view",
    "eigenvalue_labels",
    "eigenvector_top_tokens_view",
    "html_page",
    "token_activations_view",
    "view_to_html",
]


# ---------------------------------------------------------------- input checks
def _check_str_tokens(tokens: Any, name: str) -> list[str]:
    if isinstance(tokens, str) or not isinstance(tokens, Sequence):
        raise TypeError(f"{name} must be a list of token strings (e.g. model.to_str_tokens(text)), got {type(tokens).__name__}")
    bad = [t for t in tokens if not isinstance(t, str)]
    if bad:
        raise TypeError(f"{name} must contain strings only, found {type(bad[0]).__name__} {bad[0]!r}")
    if not tokens:
        raise ValueError(f"{name} is empty: a text needs at least one token")
    return list(tokens)


def _escape_tokens(tokens: Sequence[str]) -> list[str]:
    """``& < >`` escaped: circuitsvis renders tokens with innerHTML."""
    return [_html.escape(t, quote=False) for t in tokens]


def _is_many_texts(str_tokens: Any) -> bool:
    """True for ``[[tok, ...], ...]``, False for ``[tok, ...]``."""
    return isinstance(str_tokens, Sequence) and not isinstance(str_tokens, str) and len(str_tokens) > 0 and not isinstance(str_tokens[0], str)


def _per_token_matrix(acts: Any, n_tokens: int, name: str) -> np.ndarray:
    """``[pos]`` or ``[pos, n]`` activations -> ``[pos, n]``, rows checked against the tokens."""
    arr = as_array(acts, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [pos] or [pos, n_components], got shape {tuple(arr.shape)}")
    if arr.shape[0] != n_tokens:
        raise ValueError(f"{name} has {arr.shape[0]} rows (positions) but its text has {n_tokens} tokens")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no components (shape {tuple(arr.shape)})")
    return arr


def eigenvalue_labels(eigenvalues: ArrayLike, precision: int = 2) -> list[str]:
    """``["λ0=+1.23", "λ1=-0.98", ...]``: one label per eigenvalue, in the given order."""
    vals = as_array(eigenvalues, "eigenvalues").reshape(-1)
    return [f"λ{i}={v:+.{precision}f}" for i, v in enumerate(vals)]


def _component_labels(
    n: int, labels: Optional[Sequence[str]], eigenvalues: Optional[ArrayLike], prefix: str
) -> list[str]:
    if labels is not None and eigenvalues is not None:
        raise ValueError("pass labels or eigenvalues, not both")
    if eigenvalues is not None:
        labels = eigenvalue_labels(eigenvalues)
        what = "eigenvalues"
    else:
        what = "labels"
    if labels is None:
        return [f"{prefix} {i}" for i in range(n)]
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} {what} but the activations have {n} components (last dim)")
    return [str(label) for label in labels]


# ---------------------------------------------------------------- views
def eigenvector_top_tokens_view(
    activations: Union[Sequence[ArrayLike], Tensor],
    str_tokens: Sequence[Sequence[str]],
    eigenvalues: Optional[ArrayLike] = None,
    *,
    labels: Optional[Sequence[str]] = None,
    layout: Literal["dropdown", "columns"] = "dropdown",
    max_k: int = 10,
    sample_labels: Optional[Sequence[str]] = None,
    pool_texts: bool = True,
) -> RenderedHTML:
    """Top- and bottom-k tokens of each eigenvector (circuitsvis ``TopkTokens``).

    Args:
        activations: per text a ``[pos, n_eigvecs]`` array (e.g. ``lambda_i (v_i . x)^2``
            or ``v_i . x`` at every token), as a list over texts or a ``[n_texts, pos,
            n_eigvecs]`` tensor (texts of equal length).
        str_tokens: ``[n_texts][pos]`` token strings, e.g. ``model.to_str_tokens(text)``.
        eigenvalues: ``[n_eigvecs]``; components are then labelled ``λ0=+1.23`` ...
        labels: explicit component labels instead (``[n_eigvecs]``).
        layout: ``"dropdown"`` (default) puts the eigenvectors in the labelled first
            drop-down, one table per eigenvector. ``"columns"`` shows them side by side
            as table columns; circuitsvis numbers columns and cannot label them, so the
            labels then appear, joined, as the single first-dimension entry.
        max_k: how many top / bottom tokens per eigenvector (capped at the text length).
        sample_labels: ``[n_texts]`` names for the sample drop-down.
        pool_texts: with several texts, prepend an ``"all texts"`` sample whose top-k
            runs over every token of every text (circuitsvis' top-k is per sample).
    """
    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    toks, mats = _texts_and_matrices(activations, str_tokens)
    names = _component_labels(mats[0].shape[1], labels, eigenvalues, "v")
    samples = list(sample_labels) if sample_labels is not None else [f"text {i}" for i in range(len(toks))]
    if len(samples) != len(toks):
        raise ValueError(f"got {len(samples)} sample_labels for {len(toks)} texts")
    if pool_texts and len(toks) > 1:
        toks = [[tok for t in toks for tok in t], *toks]
        mats = [np.concatenate(mats, axis=0), *mats]
        samples = ["all texts", *samples]
    return topk_tokens(
        tokens=[_escape_tokens(t) for t in toks],
        max_k=max_k,
        sample_labels=samples,
        **_topk_layout(mats, names, layout),
    )


def _texts_and_matrices(
    activations: Union[Sequence[ArrayLike], Tensor], str_tokens: Sequence[Sequence[str]]
) -> tuple[list[list[str]], list[np.ndarray]]:
    """Checked ``[n_texts][pos]`` tokens and one ``[pos, n]`` matrix per text (same ``n``)."""
    if isinstance(activations, (Tensor, np.ndarray)):
        if activations.ndim != 3:
            raise ValueError(f"activations as one tensor must be [n_texts, pos, n_eigvecs], got shape {tuple(activations.shape)}")
        activations = list(activations)
    if not _is_many_texts(str_tokens):
        raise TypeError("str_tokens must be a list of token lists ([n_texts][pos]); wrap a single text in a list")
    if len(activations) != len(str_tokens):
        raise ValueError(f"got activations for {len(activations)} texts but str_tokens for {len(str_tokens)} texts")
    toks = [_check_str_tokens(t, f"str_tokens[{i}]") for i, t in enumerate(str_tokens)]
    mats = [_per_token_matrix(a, len(t), f"activations[{i}]") for i, (a, t) in enumerate(zip(activations, toks))]
    widths = {m.shape[1] for m in mats}
    if len(widths) != 1:
        raise ValueError(f"every text needs the same number of eigenvectors (last dim), got {sorted(widths)}")
    return toks, mats


def _topk_layout(mats: list[np.ndarray], names: list[str], layout: str) -> dict[str, Any]:
    """``topk_tokens`` arguments placing the eigenvectors of ``mats [pos, n]`` per ``layout``."""
    if layout == "dropdown":  # [n_eigvecs, pos, 1]: eigenvectors are the labelled first dim
        per_sample = [m.T[:, :, None].astype(np.float32) for m in mats]
        first_name, first_labels, third_name = "Eigenvector", names, "Column"
    elif layout == "columns":  # [1, pos, n_eigvecs]: eigenvectors are numbered columns
        per_sample = [m[None].astype(np.float32) for m in mats]
        first_name, first_labels, third_name = "Eigenvectors", [", ".join(names)], "Eigenvector"
    else:
        raise ValueError(f"layout must be 'dropdown' or 'columns', got {layout!r}")
    return dict(
        activations=per_sample,
        first_dimension_name=first_name,
        third_dimension_name=third_name,
        first_dimension_labels=first_labels,
    )


def token_activations_view(
    str_tokens: Union[Sequence[str], Sequence[Sequence[str]]],
    activations: Union[ArrayLike, Sequence[ArrayLike]],
    labels: Optional[Sequence[str]] = None,
    *,
    eigenvalues: Optional[ArrayLike] = None,
    component_name: str = "Eigenvector",
    layer_labels: Optional[Sequence[str]] = None,
) -> RenderedHTML:
    """Tokens coloured by the activation of each eigenvector / neuron (``TextNeuronActivations``).

    Args:
        str_tokens: one text ``[pos]`` or several ``[n_texts][pos]``.
        activations: for one text ``[pos]``, ``[pos, n]`` or ``[pos, n_layers, n]``; for
            several texts a list of those (one per text).
        labels: ``[n]`` names of the components (drop-down), or ``eigenvalues`` ``[n]``
            to label them ``λ0=+1.23`` ...
        component_name: drop-down name of the components (e.g. ``"Neuron"``).
        layer_labels: ``[n_layers]`` names when activations are 3-D.
    """
    many = _is_many_texts(str_tokens)
    if many:
        if isinstance(activations, (Tensor, np.ndarray)) or not isinstance(activations, Sequence):
            raise TypeError("with several texts, activations must be a list with one array per text")
        if len(activations) != len(str_tokens):
            raise ValueError(f"got activations for {len(activations)} texts but str_tokens for {len(str_tokens)} texts")
        texts, acts = list(str_tokens), list(activations)
    else:
        texts, acts = [str_tokens], [activations]
    toks = [_check_str_tokens(t, f"str_tokens[{i}]" if many else "str_tokens") for i, t in enumerate(texts)]
    arrays = []
    for i, (a, t) in enumerate(zip(acts, toks)):
        name = f"activations[{i}]" if many else "activations"
        arr = as_array(a, name)
        if arr.ndim in (1, 2):
            arr = _per_token_matrix(arr, len(t), name)[:, None, :]  # [pos, 1 layer, n]
        elif arr.ndim == 3:
            if arr.shape[0] != len(t):
                raise ValueError(f"{name} has {arr.shape[0]} rows (positions) but its text has {len(t)} tokens")
        else:
            raise ValueError(f"{name} must be [pos], [pos, n] or [pos, n_layers, n], got shape {tuple(arr.shape)}")
        arrays.append(arr.astype(np.float32))
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"every text needs the same [n_layers, n] trailing shape, got {sorted(shapes)}")
    n_layers, n = shapes.pop()
    names = _component_labels(n, labels, eigenvalues, component_name)
    if layer_labels is not None and len(layer_labels) != n_layers:
        raise ValueError(f"got {len(layer_labels)} layer_labels but activations have {n_layers} layers")
    return text_neuron_activations(
        tokens=[_escape_tokens(t) for t in toks] if many else _escape_tokens(toks[0]),
        activations=arrays if many else arrays[0],
        first_dimension_name="Layer",
        second_dimension_name=component_name,
        first_dimension_labels=list(layer_labels) if layer_labels is not None else None,
        second_dimension_labels=names,
    )


def colored_tokens_view(
    str_tokens: Sequence[str],
    values: ArrayLike,
    *,
    min_value: Optional[float] = None,
    max_value: Optional[float] = None,
    negative_color: Optional[str] = None,
    positive_color: Optional[str] = None,
) -> RenderedHTML:
    """One text with each token coloured by one scalar (``ColoredTokens``); ``values`` is ``[pos]``.

    By default the colour scale is symmetric, ``±max|values|``, so 0 is white.
    """
    toks = _check_str_tokens(str_tokens, "str_tokens")
    vals = as_array(values, "values")
    if vals.ndim != 1:
        raise ValueError(f"values must be [pos] (one scalar per token), got shape {tuple(vals.shape)}")
    if vals.shape[0] != len(toks):
        raise ValueError(f"values has {vals.shape[0]} entries but str_tokens has {len(toks)} tokens")
    bound = float(np.nanmax(np.abs(vals))) if np.isfinite(vals).any() else 1.0
    bound = bound or 1.0
    return colored_tokens(
        tokens=_escape_tokens(toks),
        values=vals.tolist(),
        min_value=-bound if min_value is None else min_value,
        max_value=bound if max_value is None else max_value,
        negative_color=negative_color,
        positive_color=positive_color,
    )


def _pattern_from(source: Any, layer: int, tokens: Any) -> Tensor:
    """``[batch, head, q, k]`` or ``[head, q, k]`` pattern from a model, cache or tensor."""
    name = get_act_name("pattern", layer)
    if hasattr(source, "run_with_cache"):  # a model (BilinearTransformer or TransformerBridge)
        check_layer(source, layer)
        return capture_activations(source, tokens, [name])[name]
    if isinstance(source, (Tensor, np.ndarray)):
        return torch.as_tensor(source)
    if hasattr(source, "__getitem__"):  # ActivationCache or dict of hook name -> tensor
        try:
            return torch.as_tensor(source[name])
        except KeyError as err:
            raise KeyError(f"{name!r} is not in the cache; cache it with names_filter=lambda n: n.endswith('hook_pattern')") from err
    raise TypeError(f"expected a model, an ActivationCache / dict or a pattern tensor, got {type(source).__name__}")


def _attention_input(source: Any, tokens: Union[str, Sequence[str], Tensor]) -> tuple[Any, list[str]]:
    """(what to run the model on, or ``None`` without a model; the str tokens)."""
    if not hasattr(source, "run_with_cache"):
        if isinstance(tokens, (str, Tensor)):
            raise TypeError("without a model, tokens must be the str tokens [pos] (e.g. model.to_str_tokens(text))")
        return None, _check_str_tokens(tokens, "tokens")
    if isinstance(tokens, Tensor):
        ids = tokens if tokens.dim() == 2 else tokens[None]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ValueError(f"token ids must be [pos] or [1, pos], got shape {tuple(tokens.shape)}")
        run_input: Any = ids
    elif isinstance(tokens, str):
        run_input = tokens
    else:
        raise TypeError("with a model, pass the text (str) or its token ids; str tokens need a cache or pattern tensor")
    return run_input, list(source.to_str_tokens(run_input))


def _head_patterns(
    pattern: Tensor, batch_index: int, heads: Optional[Sequence[int]], n_tokens: int
) -> tuple[Float[Tensor, "head q k"], list[int]]:
    """The ``[head, q, k]`` patterns of ``heads`` (default all; of batch row ``batch_index``
    of a 4-D pattern), checked against the ``n_tokens`` that label the axes, and the head ids."""
    if pattern.dim() == 4:
        if not 0 <= batch_index < pattern.shape[0]:
            raise ValueError(f"batch_index {batch_index} is out of range for a batch of {pattern.shape[0]}")
        pattern = pattern[batch_index]
    if pattern.dim() != 3 or pattern.shape[1] != pattern.shape[2]:
        raise ValueError(f"attention pattern must be [head, q, k] with q == k (or [batch, head, q, k]), got shape {tuple(pattern.shape)}")
    if pattern.shape[1] != n_tokens:
        raise ValueError(f"attention pattern covers {pattern.shape[1]} positions but there are {n_tokens} tokens")
    head_ids = list(range(pattern.shape[0])) if heads is None else list(heads)
    bad = [h for h in head_ids if not 0 <= h < pattern.shape[0]]
    if bad:
        raise ValueError(f"heads {bad} out of range: the layer has {pattern.shape[0]} heads")
    return pattern[head_ids], head_ids


def attention_view(
    source: Any,
    tokens: Union[str, Sequence[str], Tensor],
    layer: int = 0,
    *,
    batch_index: int = 0,
    heads: Optional[Sequence[int]] = None,
    style: Literal["patterns", "heads"] = "patterns",
) -> RenderedHTML:
    """Attention patterns of one layer over one text.

    Args:
        source: a model (its ``run_with_cache`` is run, caching only
            ``blocks.{layer}.attn.hook_pattern``), an ``ActivationCache`` / dict holding
            that hook, or a pattern tensor ``[head, q, k]`` / ``[batch, head, q, k]``.
        tokens: with a model, the text or its token ids ``[pos]`` / ``[1, pos]``; with a
            cache or tensor, the str tokens ``[pos]`` that label the axes.
        layer: which block's attention to show.
        batch_index: which batch row of a 4-D pattern to show.
        heads: head indices to show (default all).
        style: ``"patterns"`` (circuitsvis ``AttentionPatterns``) or ``"heads"``
            (``AttentionHeads``: thumbnails named ``L{layer}H{h}``, causal mask on).
    """
    run_input, str_toks = _attention_input(source, tokens)
    pattern = _pattern_from(source, layer, run_input).detach().to("cpu", torch.float32)
    pattern, head_ids = _head_patterns(pattern, batch_index, heads, len(str_toks))
    str_toks = _escape_tokens(str_toks)
    if style == "patterns":
        return attention_patterns(tokens=str_toks, attention=pattern)
    if style == "heads":
        return attention_heads(
            attention=pattern,
            tokens=str_toks,
            attention_head_names=[f"L{layer}H{h}" for h in head_ids],
            mask_upper_tri=True,
        )
    raise ValueError(f"style must be 'patterns' or 'heads', got {style!r}")


# ---------------------------------------------------------------- offline HTML
_BUNDLE_PATH = Path(__import__("circuitsvis").__file__).parent / "dist" / "cdn" / "iife.js"
_LOCAL_SRC = re.compile(
    r'^\s*<div id="(?P<uuid>[^"]+)" style="(?P<style>[^"]*)"\s*/?>\s*'
    r'<script crossorigin type="module">(?P<body>.*)</script>\s*$',
    re.DOTALL,
)


@lru_cache(maxsize=1)
def _bundle_js() -> str:
    if not _BUNDLE_PATH.is_file():
        raise FileNotFoundError(f"circuitsvis' offline bundle is missing: {_BUNDLE_PATH}")
    js = _BUNDLE_PATH.read_text(encoding="utf-8")
    js = re.sub(r"//# sourceMappingURL=\S+\s*$", "", js)  # the .map is not shipped with pages
    return js.replace("</script", "<\\/script")  # same string in JS, cannot end the tag


def circuitsvis_bundle_script() -> str:
    """``<script>`` defining the global ``CircuitsVis`` offline (~1.3 MB); once per page."""
    return f"<script>{_bundle_js()}</script>"


def _js_safe(code: str) -> str:
    """Escape sequences that would end or confuse an inline ``<script>`` (only inside JSON strings)."""
    return code.replace("</", "<\\/").replace("<!--", "<\\!--")


def view_to_html(view: RenderedHTML, include_bundle: bool = True) -> str:
    """Offline HTML for a circuitsvis view, to embed in a page opened from disk.

    ``include_bundle=True`` gives a self-contained snippet (inlines the ~1.3 MB bundle);
    with ``False`` the snippet only mounts the view and the page must contain
    :func:`circuitsvis_bundle_script` once (anywhere: the mount code is a module script,
    which runs after the page is parsed).
    """
    src = getattr(view, "local_src", None)
    if not isinstance(src, str):
        raise TypeError(f"expected a circuitsvis RenderedHTML, got {type(view).__name__}")
    match = _LOCAL_SRC.match(src)
    start = src.rfind("CircuitsVis.render(")
    if match is None or start < 0:
        raise ValueError("unrecognised circuitsvis HTML layout (circuitsvis version change?)")
    mount = _js_safe(src[start:].rsplit("</script>", 1)[0].strip())
    div = f'<div id="{match["uuid"]}" style="{match["style"]}"></div>'
    bundle = circuitsvis_bundle_script() + "\n" if include_bundle else ""
    return f'{div}\n{bundle}<script type="module">\n{mount}\n</script>'


def html_page(sections: Sequence[Any], title: str = "bilinear-lens report") -> str:
    """A self-contained HTML page (works offline from disk).

    ``sections`` items: circuitsvis views, matplotlib ``Figure`` s (embedded as base64
    PNG) or HTML strings (inserted as they are). The circuitsvis bundle is inlined once.
    """
    from matplotlib.figure import Figure

    from bilinear_lens.views.plots import figure_to_html

    parts, any_view = [], False
    for item in sections:
        if isinstance(item, RenderedHTML):
            parts.append(view_to_html(item, include_bundle=False))
            any_view = True
        elif isinstance(item, Figure):
            parts.append(figure_to_html(item))
        elif isinstance(item, str):
            parts.append(item)
        else:
            raise TypeError(f"html_page sections must be views, Figures or HTML strings, got {type(item).__name__}")
    head = circuitsvis_bundle_script() if any_view else ""
    body = "\n".join(f'<section>\n{p}\n</section>' for p in parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_html.escape(title)}</title>\n{head}\n</head>\n<body>\n"
        f"<h1>{_html.escape(title)}</h1>\n{body}\n</body>\n</html>\n"
    )
