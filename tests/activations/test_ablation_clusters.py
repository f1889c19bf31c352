"""Uncertainty of sweep effects (issue 25 audit, item 5): standard errors clustered by document
(tokens of one story are not independent samples) and a Benjamini-Hochberg correction over
the neurons of a layer (at 2 standard errors about 4.6 % of null neurons pass)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from bilinear_lens.activations.ablation import ablate_neurons, ablation_sweep
from bilinear_lens.activations.ablation.uncertainty import (
    Clusters,
    clustered_standard_error,
    document_ids,
    effect_p_values,
    false_discovery_q_values,
    row_clusters,
)
from bilinear_lens.data.packing import stream_rows
from bilinear_lens.models.model import build_model, next_token_loss

from conftest import tiny_config

BOS = 0


def _stream(doc_lengths: list[int]) -> tuple[list[int], list[int]]:
    """A token stream with a BOS before each document, and each token's true document."""
    tokens, owner = [], []
    for d, n in enumerate(doc_lengths):
        tokens += [BOS] + [1 + (d + i) % 50 for i in range(n)]
        owner += [d] * (n + 1)
    return tokens, owner


@pytest.mark.parametrize("lengths, seq_len", [([5, 9, 3, 12], 6), ([30], 8), ([2, 2, 2, 2, 2], 4), ([7, 20], 9)])
def test_document_ids_follow_the_stream_through_the_overlapping_last_row(lengths, seq_len):
    stream, owner = _stream(lengths)
    rows, overlap = stream_rows(stream, seq_len)
    ids = document_ids(rows, BOS, overlap)
    expected = torch.tensor(owner[: (rows.shape[0] - 1) * seq_len] + owner[-seq_len:]).view(rows.shape)
    assert torch.equal(ids, expected)


def test_document_ids_without_a_leading_bos_and_without_bos_at_all():
    rows = torch.tensor([[5, 6, BOS, 7], [8, BOS, 9, 9]])
    assert document_ids(rows, BOS).tolist() == [[0, 0, 1, 1], [1, 2, 2, 2]]
    assert document_ids(rows, None).tolist() == [[0] * 4, [0] * 4]
    with pytest.raises(ValueError, match=r"overlap must be in \[0, 4\)"):
        document_ids(rows, BOS, overlap=4)


def test_rows_as_clusters_is_the_row_standard_error():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 7, 5, generator=gen, dtype=torch.float64)  # 3 effects, 7 rows of 5 values
    clusters = Clusters.of(row_clusters(values[0]))
    sums = torch.stack([clusters.sums(v) for v in values])
    row_means = values.mean(-1)
    expected = row_means.std(-1, correction=1) / math.sqrt(7)
    assert torch.allclose(clustered_standard_error(sums, clusters.sizes), expected, rtol=1e-12, atol=0)


def test_one_cluster_has_no_standard_error():
    sums = torch.ones(2, 1, dtype=torch.float64)
    assert torch.isnan(clustered_standard_error(sums, torch.tensor([4.0], dtype=torch.float64))).all()


def test_clustered_standard_error_is_calibrated_where_the_row_one_is_not():
    """Monte Carlo: 40 documents of 3 rows x 8 tokens, a per-document effect (sd 1) plus
    token noise (sd 1). The spread of the mean over 3000 draws is the true SE; the clustered
    estimate's RMS must be within 10 % of it (Monte Carlo error of an SD over 3000 draws is
    ~1.3 %, CR1's small-sample bias at 40 clusters ~1 %); rows taken as independent samples
    understate it by ~sqrt(3)-fold (3 correlated rows per document), so below 70 %."""
    rng = np.random.default_rng(0)
    n_docs, rows_per_doc, pos, draws = 40, 3, 8, 3000
    labels = torch.arange(n_docs).repeat_interleave(rows_per_doc)[:, None].expand(-1, pos)
    docs, rows = Clusters.of(labels), Clusters.of(row_clusters(labels))
    effect = rng.normal(size=(draws, n_docs, 1, 1)) + rng.normal(size=(draws, n_docs, rows_per_doc, pos))
    values = torch.from_numpy(effect.reshape(draws, n_docs * rows_per_doc, pos))
    means = values.mean((1, 2))
    true_se = float(means.std())
    doc_se = clustered_standard_error(torch.stack([docs.sums(v) for v in values]), docs.sizes)
    row_se = clustered_standard_error(torch.stack([rows.sums(v) for v in values]), rows.sizes)
    assert abs(float(doc_se.pow(2).mean().sqrt()) / true_se - 1) < 0.10
    assert float(row_se.pow(2).mean().sqrt()) / true_se < 0.70


def test_p_values_are_student_t_with_clusters_minus_one_degrees_of_freedom():
    effect = torch.tensor([0.3, -0.3, 0.0, 0.5, 0.2], dtype=torch.float64)
    se = torch.tensor([0.1, 0.1, 0.0, 0.0, float("nan")], dtype=torch.float64)
    p = effect_p_values(effect, se, n_clusters=12)
    assert p[0].item() == pytest.approx(2 * stats.t.sf(3.0, df=11), rel=1e-12) and p[0] == p[1]
    assert p[2].item() == 1.0 and p[3].item() == 0.0 and math.isnan(p[4].item())
    assert torch.isnan(effect_p_values(effect, se, n_clusters=1)).all()


def test_q_values_are_benjamini_hochberg_ignoring_nan():
    p = torch.tensor([0.01, 0.04, float("nan"), 0.03, 0.5], dtype=torch.float64)
    # sorted 0.01, 0.03, 0.04, 0.5 (m = 4): p*m/rank = 0.04, 0.06, 0.0533, 0.5; running min from the top
    q = false_discovery_q_values(p)
    assert q[[0, 1, 3, 4]].tolist() == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5], rel=1e-12)
    assert math.isnan(q[2].item())
    assert torch.isnan(false_discovery_q_values(torch.full((3,), float("nan")))).all()


def test_sweep_with_documents_is_the_clustered_formula_on_per_token_deltas():
    model = build_model(tiny_config(dtype="float64"))
    tokens = torch.randint(1, 97, (6, 9), generator=torch.Generator().manual_seed(3))
    documents = torch.tensor([0, 0, 1, 1, 1, 2])[:, None].expand(-1, 9).clone()
    documents[2, :4] = 0  # a document boundary inside row 2
    neurons = [1, 4, 9]
    table = ablation_sweep(model, tokens, 0, neurons, documents=documents, progress=False)
    assert table.uncertainty == {"clusters": "documents", "n_clusters": {"loss": 3}}
    target_docs = documents[:, 1:].reshape(-1)  # a loss belongs to the token it predicts
    for i, neuron in enumerate(neurons):
        with torch.no_grad():
            clean = next_token_loss(model(tokens), tokens, per_token=True)
            with ablate_neurons(model, 0, [neuron]):
                ablated = next_token_loss(model(tokens), tokens, per_token=True)
        d = (ablated - clean).reshape(-1)
        n, m = d.numel(), d.mean()
        groups = [d[target_docs == g] for g in range(3)]
        expected = math.sqrt(3 / 2 * sum(float((g.sum() - g.numel() * m) ** 2) for g in groups)) / n
        assert table["delta_loss"][i].item() == pytest.approx(m.item(), abs=1e-12)
        assert table["delta_loss_se"][i].item() == pytest.approx(expected, rel=1e-9)
        t = abs(m.item()) / expected
        assert table["delta_loss_p"][i].item() == pytest.approx(2 * stats.t.sf(t, df=2), rel=1e-6)
    assert torch.allclose(table["delta_loss_q"], false_discovery_q_values(table["delta_loss_p"]))


def test_sweep_refuses_documents_of_another_shape():
    model = build_model(tiny_config())
    tokens = torch.randint(1, 97, (3, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"documents must be an integer tensor of the tokens' shape \(3, 5\).*got \(3, 4\)"):
        ablation_sweep(model, tokens, 0, [0], documents=torch.zeros(3, 4, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match=r"documents must be an integer tensor"):
        ablation_sweep(model, tokens, 0, [0], documents=torch.zeros(3, 5), progress=False)
