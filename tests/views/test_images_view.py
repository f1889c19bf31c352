"""Eigenvector figures and the image report: the figures show the eigenvectors' pixels, the
report is self-contained HTML whose eigenvector images render in headless Chromium."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from bilinear_lens.views.image_plots import (
    image_report,
    plot_class_eigenvectors,
    plot_class_spectra,
    plot_eigen_grid,
    write_image_report,
)
from bilinear_lens.weights.image_eigen import class_eigendecomposition
from browser import CHROMIUM, ERROR_RECORDER, dump_dom
from images_fixtures import digits, trained_digits_model


def test_eigenvector_figure_shows_the_eigenvectors_with_their_eigenvalues():
    eig = class_eigendecomposition(trained_digits_model())
    fig = plot_class_eigenvectors(eig, 5, top=3)
    axes = fig.axes
    assert len(axes) == 6
    images, values = eig.images(5, "positive", 3)
    shown = axes[0].images[0].get_array()
    assert np.allclose(np.asarray(shown), images[0].numpy())
    assert axes[0].get_title() == f"λ={float(values[0]):.3g}"
    neg, neg_values = eig.images(5, "negative", 3)
    assert np.allclose(np.asarray(axes[3].images[0].get_array()), neg[0].numpy())
    lo, hi = axes[0].images[0].get_clim()
    assert lo == -hi  # diverging scale centred on zero
    assert len(plot_eigen_grid(eig).axes) == 20
    assert len(plot_class_spectra(eig).axes[0].lines) == 10 + 1  # one per class, plus the zero line
    with pytest.raises(ValueError, match="top must be an integer >= 1, got 0"):
        plot_class_eigenvectors(eig, 5, top=0)


def test_report_is_self_contained_with_png_eigenvectors(tmp_path):
    data = digits()
    page = image_report(trained_digits_model(), data.test_x, data.test_y, class_names=data.class_names)
    assert "http://" not in page and "https://" not in page
    imgs = re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]*)">', page)
    alts = [alt for _, alt in imgs]
    assert "eigenvector grid" in alts and all(f"eigenvectors of class {c}" in alts for c in data.class_names)
    assert all(base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n" for b64, _ in imgs)
    assert "top-4 eigenvectors per class" in page and "eigenvector mask" in page
    path = write_image_report(trained_digits_model(), tmp_path / "r.html")
    assert path.read_text().startswith("<!DOCTYPE html>")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium / chromium-browser / google-chrome on PATH")
def test_eigenvector_images_render_in_a_headless_browser(tmp_path):
    page = image_report(trained_digits_model())
    page = page.replace("<head>", "<head>\n" + ERROR_RECORDER, 1)
    probe = """<script>
    window.addEventListener("load", () => {
      const imgs = [...document.querySelectorAll("img")];
      document.documentElement.setAttribute("data-rendered",
        JSON.stringify(imgs.map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])));
    });
    </script>"""
    dom = dump_dom(page.replace("</body>", probe + "</body>"), tmp_path)
    assert re.search(r'<html[^>]*data-js-errors="([^"]*)"', dom) is None  # no script error recorded
    rendered = re.search(r"data-rendered=\"([^\"]*)\"", dom)
    assert rendered is not None
    import html
    import json

    rows = json.loads(html.unescape(rendered.group(1)))
    eigen = [r for r in rows if r[0].startswith("eigenvectors of class") or r[0] == "eigenvector grid"]
    assert len(eigen) == 11
    assert all(complete and w > 50 and h > 50 for _, complete, w, h in eigen)  # decoded, non-empty images
