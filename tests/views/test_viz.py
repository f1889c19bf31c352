"""circuitsvis views (props checked by parsing the rendered HTML), offline HTML embedding,
matplotlib figures (bars / points / labels checked against the inputs), and a headless
Chromium check that the offline page actually renders (skipped without chromium)."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from browser import CHROMIUM, ERROR_RECORDER, dump_dom
from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.model import build_model
from bilinear_lens.views.plots import (
    figure_to_base64_png,
    figure_to_html,
    plot_ablation_effects,
    plot_boundary_density,
    plot_eigenvalue_spectrum,
    plot_interaction_heatmap,
    plot_rank_k_curve,
    plot_rank_k_scatter,
)
from bilinear_lens.views.viz import (
    attention_view,
    circuitsvis_bundle_script,
    colored_tokens_view,
    eigenvalue_labels,
    eigenvector_top_tokens_view,
    html_page,
    token_activations_view,
    view_to_html,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_RENDER = re.compile(r'render\(\s*"(circuits-vis-[^"]+)",\s*(?:CircuitsVis\.)?(\w+),\s*(\{.*\})\s*\)\s*</script>', re.DOTALL)


def props(view) -> tuple[str, dict]:
    """(component name, props) of a circuitsvis view, parsed from its HTML."""
    match = _RENDER.search(str(view))
    assert match is not None, "no circuitsvis render call in the view's HTML"
    return match[2], json.loads(match[3])


def esc(tokens: list[str]) -> list[str]:
    """Tokens as the views pass them to circuitsvis (HTML-escaped: it renders with innerHTML)."""
    return [html.escape(t, quote=False) for t in tokens]


@pytest.fixture(scope="module")
def model(small_tokenizer):
    tok = small_tokenizer
    cfg = ModelConfig(d_vocab=len(tok), d_model=32, n_layers=2, n_heads=4, n_ctx=64, seed=0)
    return build_model(cfg, tokenizer=tok)


@pytest.fixture
def texts():
    str_tokens = [["<bos>", " the", " cat", " is", " not", " happy"], ["<bos>", " a", " dog"]]
    gen = torch.Generator().manual_seed(0)
    acts = [torch.randn(len(t), 4, generator=gen) for t in str_tokens]
    return str_tokens, acts


# ---------------------------------------------------------------- circuitsvis views
def test_eigenvalue_labels():
    assert eigenvalue_labels(torch.tensor([1.234, -0.5])) == ["λ0=+1.23", "λ1=-0.50"]


def test_top_tokens_dropdown_pools_texts_and_labels_eigenvalues(texts):
    str_tokens, acts = texts
    eig = torch.tensor([2.0, -1.5, 1.0, 0.25])
    name, p = props(eigenvector_top_tokens_view(acts, str_tokens, eig, max_k=3))
    assert name == "TopkTokens"
    assert p["firstDimensionLabels"] == ["λ0=+2.00", "λ1=-1.50", "λ2=+1.00", "λ3=+0.25"]
    assert p["sampleLabels"] == ["all texts", "text 0", "text 1"]
    pooled_tokens = [t for text in str_tokens for t in text]
    assert p["tokens"] == [esc(pooled_tokens), *map(esc, str_tokens)]
    # pooled sample, eigenvector 2: top-3 over all 9 tokens of both texts
    pooled = torch.cat(acts).numpy()
    expected_idx = np.argsort(-pooled[:, 2])[:3]
    assert [row[0] for row in p["topkIdxs"][0][2]] == expected_idx.tolist()
    np.testing.assert_allclose([row[0] for row in p["topkVals"][0][2]], pooled[expected_idx, 2], rtol=1e-6)
    # text 1 has 3 tokens: k is capped at its length
    assert len(p["topkIdxs"][2][0]) == 3 and len(p["bottomkIdxs"][2][0]) == 3


def test_top_tokens_columns_layout_and_tensor_input():
    gen = torch.Generator().manual_seed(1)
    acts = torch.randn(2, 5, 3, generator=gen)  # [n_texts, pos, n_eigvecs]
    toks = [[f"t{i}" for i in range(5)], [f"u{i}" for i in range(5)]]
    _, p = props(
        eigenvector_top_tokens_view(acts, toks, labels=["a", "b", "c"], layout="columns", pool_texts=False, max_k=2)
    )
    assert p["sampleLabels"] == ["text 0", "text 1"]
    assert p["firstDimensionLabels"] == ["a, b, c"]
    assert np.array(p["topkVals"]).shape == (2, 1, 2, 3)  # [sample, 1, k, eigvec]
    np.testing.assert_allclose(np.array(p["topkVals"])[1, 0, 0], acts[1].max(0).values.numpy(), rtol=1e-6)


def test_top_tokens_shape_errors(texts):
    str_tokens, acts = texts
    with pytest.raises(ValueError, match=r"activations\[1\] has 4 rows .* its text has 3 tokens"):
        eigenvector_top_tokens_view([acts[0], torch.zeros(4, 4)], str_tokens)
    with pytest.raises(ValueError, match="got 3 eigenvalues but the activations have 4 components"):
        eigenvector_top_tokens_view(acts, str_tokens, torch.ones(3))
    with pytest.raises(ValueError, match="activations for 1 texts but str_tokens for 2"):
        eigenvector_top_tokens_view(acts[:1], str_tokens)
    with pytest.raises(TypeError, match="list of token lists"):
        eigenvector_top_tokens_view(acts[:1], str_tokens[0])


def test_token_activations_view_one_and_many_texts(texts):
    str_tokens, acts = texts
    name, p = props(token_activations_view(str_tokens[0], acts[0], labels=["v0", "v1", "v2", "v3"]))
    assert name == "TextNeuronActivations"
    assert p["tokens"] == esc(str_tokens[0]) and p["secondDimensionLabels"] == ["v0", "v1", "v2", "v3"]
    np.testing.assert_allclose(np.array(p["activations"])[:, 0, :], acts[0].numpy(), rtol=1e-6)  # [pos, layer, n]

    _, p = props(token_activations_view(str_tokens, acts, eigenvalues=[1.0, -2.0, 3.0, 0.5], component_name="Eigvec"))
    assert p["tokens"] == [esc(t) for t in str_tokens] and p["secondDimensionName"] == "Eigvec"
    assert p["secondDimensionLabels"][1] == "λ1=-2.00"
    assert [len(a) for a in p["activations"]] == [6, 3]


def test_token_activations_view_errors(texts):
    str_tokens, acts = texts
    with pytest.raises(ValueError, match="activations has 3 rows .* its text has 6 tokens"):
        token_activations_view(str_tokens[0], acts[1])
    with pytest.raises(ValueError, match="got 2 labels but the activations have 4 components"):
        token_activations_view(str_tokens[0], acts[0], labels=["a", "b"])
    with pytest.raises(TypeError, match="one array per text"):
        token_activations_view(str_tokens, torch.zeros(6, 4))


def test_colored_tokens_view_symmetric_scale():
    name, p = props(colored_tokens_view(["a", "b<c", "&"], torch.tensor([0.5, -2.0, 1.0])))
    assert name == "ColoredTokens"
    assert p["tokens"] == ["a", "b&lt;c", "&amp;"] and p["values"] == [0.5, -2.0, 1.0]
    assert (p["minValue"], p["maxValue"]) == (-2.0, 2.0)
    with pytest.raises(ValueError, match="values has 2 entries but str_tokens has 3 tokens"):
        colored_tokens_view(["a", "b", "c"], [1.0, 2.0])


def test_attention_view_from_model_matches_cache(model):
    text = "the cat sat"
    name, p = props(attention_view(model, text, layer=1))
    assert name == "AttentionPatterns"
    assert p["tokens"][0] == "&lt;|endoftext|&gt;"  # tokens are HTML-escaped (circuitsvis uses innerHTML)
    assert p["tokens"] == esc(model.to_str_tokens(text))
    _, cache = model.run_with_cache(text, names_filter="blocks.1.attn.hook_pattern")
    np.testing.assert_allclose(np.array(p["attention"]), cache["blocks.1.attn.hook_pattern"][0].numpy(), atol=1e-6)

    # same view from the cache / a tensor plus str tokens; head subset, heads style
    _, p_cache = props(attention_view(cache, model.to_str_tokens(text), layer=1))
    assert p_cache["attention"] == p["attention"]
    name, p_heads = props(attention_view(cache["blocks.1.attn.hook_pattern"], p["tokens"], 1, heads=[3, 0], style="heads"))
    assert name == "AttentionHeads" and p_heads["attentionHeadNames"] == ["L1H3", "L1H0"]
    assert p_heads["attention"] == [p["attention"][3], p["attention"][0]]


def test_attention_view_errors(model):
    pattern = torch.rand(4, 5, 5)
    with pytest.raises(ValueError, match="covers 5 positions but there are 3 tokens"):
        attention_view(pattern, ["a", "b", "c"])
    with pytest.raises(ValueError, match="layer 5 is out of range: the model has 2 layers"):
        attention_view(model, "the cat", layer=5)
    with pytest.raises(ValueError, match=r"heads \[4\] out of range"):
        attention_view(pattern, list("abcde"), heads=[4])
    with pytest.raises(KeyError, match="blocks.0.attn.hook_pattern"):
        attention_view({}, list("abcde"))


# ---------------------------------------------------------------- offline HTML
def test_view_to_html_is_offline_and_closes_the_mount_div():
    view = colored_tokens_view(["</script><b>x", "y"], [1.0, -1.0])
    assert "unpkg.com" in str(view)  # circuitsvis' str() needs the CDN ...
    snippet = view_to_html(view)  # ... ours inlines the bundle
    assert "unpkg.com" not in snippet and "var CircuitsVis=" in snippet
    uuid = re.search(r'id="(circuits-vis-[^"]+)"', snippet)[1]
    assert f'<div id="{uuid}" style="margin: 15px 0;"></div>' in snippet
    assert "/>" not in snippet.split("<script", 1)[0]
    # every "</script" in the snippet closes one of its two script tags (the token is escaped)
    assert snippet.count("</script") == 2 and "&lt;/script&gt;&lt;b&gt;x" in snippet
    mount_only = view_to_html(view, include_bundle=False)
    assert "var CircuitsVis=" not in mount_only and f'CircuitsVis.render(\n      "{uuid}"' in mount_only
    with pytest.raises(TypeError, match="RenderedHTML"):
        view_to_html("<div></div>")


def test_html_page_inlines_bundle_once():
    views = [colored_tokens_view(["a"], [1.0]), colored_tokens_view(["b"], [2.0])]
    page = html_page([*views, plot_rank_k_curve([1, 2], [0.5, 0.9]), "<p>note</p>"], title="R & D")
    assert page.count(circuitsvis_bundle_script()) == 1
    assert page.count("CircuitsVis.render(") == 2
    assert page.count('<img src="data:image/png;base64,') == 1 and "<p>note</p>" in page
    assert "<title>R &amp; D</title>" in page


# ---------------------------------------------------------------- figures
def test_spectrum_bars_are_sorted_eigenvalues_coloured_by_sign():
    eig = torch.tensor([0.3, -2.0, 1.0, -0.1, 0.7])
    ax = plot_eigenvalue_spectrum(eig, title="u = ' happy'").axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights, [-2.0, 1.0, 0.7, 0.3, -0.1], rtol=1e-6)
    colors = {tuple(bar.get_facecolor()) for bar, h in zip(ax.patches, heights) if h < 0}
    assert len(colors) == 1 and colors != {tuple(ax.patches[1].get_facecolor())}
    assert ax.get_title() == "u = ' happy'"
    assert len(plot_eigenvalue_spectrum(eig, top=2).axes[0].patches) == 2


def test_spectrum_overlays_several_directions():
    gen = torch.Generator().manual_seed(0)
    eigs = {"pos": torch.randn(8, generator=gen), "neg": torch.randn(8, generator=gen)}
    ax = plot_eigenvalue_spectrum(eigs, top=5).axes[0]
    lines = [line for line in ax.get_lines() if line.get_label() in eigs]
    assert [line.get_label() for line in lines] == ["pos", "neg"]
    for line, vals in zip(lines, eigs.values()):
        expected = vals.numpy()[np.argsort(-np.abs(vals.numpy()))][:5]
        np.testing.assert_allclose(line.get_ydata(), expected, rtol=1e-6)


def test_interaction_heatmap_labels_and_centred_colormap():
    labels = [" good", " bad", " not", " very"]
    mat = np.random.default_rng(0).normal(size=(4, 4))
    fig = plot_interaction_heatmap(mat, labels, title="negation")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    vmin, vmax = ax.images[0].get_clim()
    assert vmin == -vmax == -np.abs(mat).max()
    assert len(fig.axes) == 2  # heat map + colour bar
    with pytest.raises(ValueError, match="matrix has 4 columns but 3 col_labels"):
        plot_interaction_heatmap(mat, labels, labels[:3])


def test_rank_k_scatter_points_and_correlation():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(10, 5))
    approx = true + 0.3 * rng.normal(size=(10, 5))
    ax = plot_rank_k_scatter(torch.tensor(true), approx, k=3).axes[0]
    assert len(ax.collections[0].get_offsets()) == 50
    r = np.corrcoef(true.ravel(), approx.ravel())[0, 1]
    assert ax.get_title() == f"Rank-3 approximation (r = {r:.3f})"
    with pytest.raises(ValueError, match="true has 50 values but approx has 49"):
        plot_rank_k_scatter(true, approx.ravel()[:49], k=3)


def test_rank_k_curve():
    ax = plot_rank_k_curve([1, 2, 4, 8], {"ours": [0.5, 0.8, 0.95, 0.99], "relu": [0.3, 0.5, 0.6, 0.7]}).axes[0]
    assert [list(line.get_ydata()) for line in ax.get_lines()] == [[0.5, 0.8, 0.95, 0.99], [0.3, 0.5, 0.6, 0.7]]
    with pytest.raises(ValueError, match="ks has 4 entries but correlations has 3"):
        plot_rank_k_curve([1, 2, 4, 8], [0.1, 0.2, 0.3])


def test_ablation_bars_are_the_largest_effects():
    deltas = torch.tensor(np.random.default_rng(0).normal(size=50))
    ax = plot_ablation_effects(deltas, top=7).axes[0]
    order = np.argsort(-np.abs(deltas.numpy()))[:7]
    assert len(ax.patches) == 7
    np.testing.assert_allclose([bar.get_width() for bar in ax.patches], deltas.numpy()[order])
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"#{i}" for i in order]
    ax2 = plot_ablation_effects(torch.tensor([[0.0, 3.0], [-5.0, 1.0]]), top=2).axes[0]
    assert [t.get_text() for t in ax2.get_yticklabels()] == ["L1.0", "L0.1"]
    with pytest.raises(ValueError, match="got 2 labels for 50 deltas"):
        plot_ablation_effects(deltas, labels=["a", "b"])


@pytest.mark.parametrize("per_step", [True, False])
def test_boundary_density(per_step):
    t = np.linspace(0, 1, 11)
    changes = np.arange(10 if per_step else 11, dtype=float)
    fig = plot_boundary_density(t, changes)
    assert len(fig.axes) == 2
    cumulative = fig.axes[1].get_lines()[0]
    assert len(cumulative.get_xdata()) == 11 and cumulative.get_ydata()[-1] == changes.sum()


def test_boundary_density_shape_error():
    with pytest.raises(ValueError, match="changes has 5 entries but t has 11; expected 10 .* or 11"):
        plot_boundary_density(np.linspace(0, 1, 11), np.ones(5))


def test_png_and_html_embedding():
    fig = plot_rank_k_curve([1, 2], [0.1, 0.2])
    png = base64.b64decode(figure_to_base64_png(fig))
    assert png.startswith(PNG_MAGIC)
    assert fig._repr_png_().startswith(PNG_MAGIC)  # Jupyter shows it once, pyplot or not
    tag = figure_to_html(fig, alt='a "b"')
    assert tag.startswith('<img src="data:image/png;base64,iVBORw0KGgo') and 'alt="a &quot;b&quot;"' in tag


# ---------------------------------------------------------------- headless browser

# Records JS errors (uncaught exceptions, rejections, console.error) on <html data-js-errors>,
# so --dump-dom reports them; Chromium's stderr log does not tell console levels apart.
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install -y chromium)")
def test_offline_page_renders_in_headless_chromium(tmp_path, texts):
    str_tokens, acts = texts
    views = [
        colored_tokens_view(["</script>", " ok"], [1.0, -1.0]),  # must not end the inline script
        token_activations_view(str_tokens, acts),
        eigenvector_top_tokens_view(acts, str_tokens, torch.arange(4.0)),
        attention_view(torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0)).tril(), str_tokens[0]),
    ]
    page = html_page([*views, '<p id="after">after</p>'])
    page = page.replace("<head>", "<head>\n" + ERROR_RECORDER, 1)
    dom = dump_dom(page, tmp_path)
    errors = re.search(r'<html[^>]*data-js-errors="([^"]*)"', dom)
    assert errors is None, html.unescape(errors[1])
    dom = re.sub(r"<script.*?</script>", "", dom, flags=re.DOTALL)
    mounts = re.findall(r'<div id="circuits-vis-[^"]+" style="[^"]*">(.{0,40})', dom)
    assert len(mounts) == 4 and all(m.startswith("<div") for m in mounts), mounts  # React filled each mount
    assert 'class="colored-tokens"' in dom and "&lt;/script&gt;" in dom and "Topk" in dom and "Attention Patterns" in dom
    assert '<p id="after">after</p>' in dom
