"""Spline codes, region tracking, boundary density and purity (the polytope lens)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bilinear_lens.models.bridge import to_bridge
from bilinear_lens.commands.polytope import main as polytope_main
from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.mlp import MLP
from bilinear_lens.models.model import build_model
from bilinear_lens.activations.region_counts import RegionCounts
from bilinear_lens.activations.polytope import (
    RegionTracker,
    code_path_profile,
    compare_purity,
    embedding_path_profile,
    kmeans,
    purity,
    purity_report,
    residual_path_profile,
    track_regions,
)
from bilinear_lens.activations.spline_codes import (
    basis_codes,
    code_layout,
    default_factors,
    hamming,
    pack_bits,
    pack_signs,
    pairwise_hamming,
    popcount,
    region_ids,
    residual_codes,
    spline_codes,
    unpack_bits,
)
from bilinear_lens.data.synthetic import synthetic_stories
from conftest import tiny_config


@pytest.fixture(scope="module")
def relu_model():
    return build_model(tiny_config(mlp_kind="relu", mlp_bias=True))


@pytest.fixture(scope="module")
def data_tokens():
    return torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(1))


# ---- packing -------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 7, 8, 13, 64, 100])
def test_pack_unpack_round_trip(d):
    bits = torch.rand(3, 5, d, generator=torch.Generator().manual_seed(d)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, (d + 7) // 8)
    assert torch.equal(unpack_bits(packed, d), bits)
    assert torch.equal(pack_signs(bits.float() - 0.5), packed)


def test_bit_order_is_little_endian_within_bytes():
    bits = torch.zeros(10, dtype=torch.bool)
    bits[0] = bits[9] = True
    assert pack_bits(bits).tolist() == [1, 2]  # unit 0 -> bit 0 of byte 0; unit 9 -> bit 1 of byte 1


def test_popcount_and_hamming_match_bool_arithmetic():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(20, 37, generator=gen) > 0.5, torch.rand(20, 37, generator=gen) > 0.5
    pa, pb = pack_bits(a), pack_bits(b)
    assert torch.equal(popcount(pa), a.sum(-1))
    assert torch.equal(hamming(pa, pb), (a != b).sum(-1))
    assert torch.equal(pairwise_hamming(pa, pb), (a[:, None] != b[None]).sum(-1))


def test_region_ids_separate_one_and_two_bit_neighbours():
    base = torch.rand(200, generator=torch.Generator().manual_seed(0)) > 0.5
    flips = [()] + [(i,) for i in range(200)] + [(i, j) for i in range(0, 200, 3) for j in range(i + 1, 200)]
    codes = base.repeat(len(flips), 1)
    for row, units in enumerate(flips):
        codes[row, list(units)] ^= True
    ids = region_ids(pack_bits(codes))
    assert ids.dtype == np.uint64 and np.unique(ids).size == len(flips)
    assert region_ids(pack_bits(codes[:5]))[3] == ids[3]  # an id depends on the code alone


# ---- codes from models -------------------------------------------------------------------


def test_relu_codes_are_pre_activation_signs(relu_model, data_tokens):
    codes = spline_codes(relu_model, data_tokens, layers=1)
    _, cache = relu_model.run_with_cache(data_tokens)
    pre = cache["blocks.1.mlp.hook_pre"]
    assert codes.shape == (12, 16, 48 // 8)
    assert torch.equal(unpack_bits(codes, 48), pre > 0)


def test_codes_of_several_layers_concatenate(relu_model, data_tokens):
    layout = code_layout(relu_model, [0, 1])
    codes = spline_codes(relu_model, data_tokens, layers=[0, 1])
    _, cache = relu_model.run_with_cache(data_tokens)
    assert layout.hook_names == ["blocks.0.mlp.hook_pre", "blocks.1.mlp.hook_pre"]
    expected = torch.cat([cache["blocks.0.mlp.hook_pre"] > 0, cache["blocks.1.mlp.hook_pre"] > 0], -1)
    assert torch.equal(layout.unpack(codes), expected)


def test_bilinear_codes_use_both_factors(data_tokens):
    model = build_model(tiny_config(mlp_kind="bilinear", d_mlp=44))
    assert default_factors("bilinear") == ("pre", "pre_linear")
    layout = code_layout(model, 0)
    codes = spline_codes(model, data_tokens, layers=0)
    _, cache = model.run_with_cache(data_tokens)
    assert [s.byte_offset for s in layout.segments] == [0, 6] and codes.shape[-1] == 12
    assert torch.equal(layout.unpack_segment(codes, "blocks.0.mlp.hook_pre"), cache["blocks.0.mlp.hook_pre"] > 0)
    assert torch.equal(layout.unpack_segment(codes, "blocks.0.mlp.hook_pre_linear"), cache["blocks.0.mlp.hook_pre_linear"] > 0)
    # The product is positive where the factors' signs agree (no exact zeros here).
    product = spline_codes(model, data_tokens, layers=0, factors=["post"])
    assert torch.equal(unpack_bits(product, 44), (cache["blocks.0.mlp.hook_pre"] > 0) == (cache["blocks.0.mlp.hook_pre_linear"] > 0))


def test_layouts_reject_kinds_and_layers_without_units():
    with pytest.raises(ValueError, match="affine everywhere"):
        code_layout(build_model(tiny_config(mlp_kind="linear")), 0)
    with pytest.raises(ValueError, match="no MLP units"):
        code_layout(build_model(tiny_config(mlp_kind="none")), 0)
    with pytest.raises(ValueError, match="out of range"):
        code_layout(build_model(tiny_config(mlp_kind="relu")), 2)
    with pytest.raises(KeyError, match="hook_pre_linear"):  # plain MLPs have no second factor
        code_layout(build_model(tiny_config(mlp_kind="relu")), 0, ["pre_linear"])


def test_residual_codes_match_layer_codes(relu_model, data_tokens):
    _, cache = relu_model.run_with_cache(data_tokens)
    resid = cache["blocks.1.hook_resid_mid"]
    assert torch.equal(residual_codes(relu_model, 1, resid, batch_size=50), spline_codes(relu_model, data_tokens, 1))
    basis = torch.randn(32, 20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_bits(basis_codes(resid, basis), 20), resid @ basis > 0)


def test_codes_are_the_same_through_the_bridge(data_tokens):
    model = build_model(tiny_config(mlp_kind="bilinear"))
    bridge = to_bridge(model)
    assert torch.equal(spline_codes(bridge, data_tokens, [0, 1]), spline_codes(model, data_tokens, [0, 1]))
    resid = model.run_with_cache(data_tokens)[1]["blocks.0.hook_resid_mid"][:2]
    assert torch.equal(residual_codes(bridge, 0, resid), residual_codes(model, 0, resid))
    tracked = [track_regions(m, data_tokens.split(5), 0)[0].counts for m in (model, bridge)]
    assert tracked[0] == tracked[1]


# ---- geometry: affine inside a region, boundaries along a path ------------------------------


def _jacobian(f, x, h=1e-6):
    cols = [(f(x + h * e) - f(x - h * e)) / (2 * h) for e in torch.eye(x.shape[0], dtype=x.dtype)]
    return torch.stack(cols, dim=1)


def test_relu_mlp_is_affine_inside_a_region():
    torch.manual_seed(0)
    mlp = MLP(8, 24, act="relu", bias=True).double()
    for p in mlp.parameters():
        torch.nn.init.normal_(p)
    code = lambda x: pack_signs(mlp.hook_pre(getattr(mlp, "in")(x)))  # noqa: E731
    with torch.no_grad():
        x = torch.randn(8, dtype=torch.float64)
        step = torch.randn(8, dtype=torch.float64)
        y = x + 1e-2 * step
        while not torch.equal(code(y), code(x)):
            y = x + (y - x) / 2
        far = next(x + s * step for s in (1.0, 2.0, 4.0, 8.0) if not torch.equal(code(x + s * step), code(x)))
        J_x, J_y, J_far = _jacobian(mlp, x), _jacobian(mlp, y), _jacobian(mlp, far)
    assert not torch.equal(y, x)
    # one affine map: central differences in float64 are then exact up to rounding, ~1e-16 / h
    # = 1e-10; across a boundary the Jacobians differ by O(1e-1) (last line)
    torch.testing.assert_close(J_y, J_x, rtol=0, atol=1e-7)
    assert (J_far - J_x).abs().max() > 1e-3  # another region: another affine map


def test_boundaries_on_a_straight_path_equal_sign_changes():
    """No bias, one layer: pre(t) is linear in t, so each unit crosses at most once."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(16, 40, generator=gen, dtype=torch.float64)
    a, b = torch.randn(16, generator=gen, dtype=torch.float64), torch.randn(16, generator=gen, dtype=torch.float64)
    pa, pb = a @ W, b @ W
    expected = int(((pa > 0) != (pb > 0)).sum())
    crossings = torch.sort((pa / (pa - pb))[(pa > 0) != (pb > 0)]).values
    n_steps = int(4 / crossings.diff().min()) + 1  # fine enough to separate every crossing
    profile = code_path_profile(lambda x: pack_signs(x @ W), a, b, n_units=40, n_steps=n_steps)
    assert expected > 5
    assert profile.n_flips == expected and profile.hamming_to_start[-1] == expected
    assert profile.n_boundary_steps == expected and profile.changes.max() == 1
    assert profile.t.shape == profile.distance.shape == (n_steps + 1,)
    np.testing.assert_allclose(profile.length, float((b - a).norm()))


def test_model_path_profiles(relu_model, data_tokens):
    model = build_model(tiny_config(mlp_kind="relu", normalization_type="RMSPre", n_layers=1))
    resid = model.run_with_cache(data_tokens)[1]["blocks.0.hook_resid_mid"]
    start, end = resid[0, 3], resid[1, 7]
    profile = residual_path_profile(model, 0, start, end, n_steps=400)
    # RMSPre rescales by a positive number, so without biases the signs are those of x @ W_in.
    W_in = model.blocks[0].mlp.W_in
    assert profile.hamming_to_start[-1] == profile.n_flips == int(((start @ W_in > 0) != (end @ W_in > 0)).sum())
    walk = embedding_path_profile(relu_model, data_tokens[0], 4, token_a=5, token_b=60, layers=1, n_steps=64)
    ends = data_tokens[0].repeat(2, 1)
    ends[:, 4] = torch.tensor([5, 60])
    codes = spline_codes(relu_model, ends, 1)[:, 4]
    assert walk.hamming_to_start[-1] == int(hamming(codes[0], codes[1]))
    assert walk.n_flips >= walk.hamming_to_start[-1] and walk.distance[-1] > 0


# ---- streaming region counts ---------------------------------------------------------------


def test_streaming_counts_do_not_depend_on_batch_size(relu_model, data_tokens):
    codes = spline_codes(relu_model, data_tokens, 0).reshape(-1, 6)
    ids, counts = np.unique(region_ids(codes), return_counts=True)
    in_memory = dict(zip(ids.tolist(), counts.tolist()))
    for batch in (1, 5, 12):
        tracker, _ = track_regions(relu_model, data_tokens.split(batch), 0, examples_per_region=2)
        assert tracker.counts == in_memory and tracker.n_tokens == data_tokens.numel()
        for region, count in tracker.most_common(3):
            assert len(tracker.examples(region)) == min(count, 2)


def test_tracker_reservoirs_are_bounded_and_uniform():
    gen = np.random.default_rng(0)
    bits = gen.random((4000, 12)) < 0.5
    bits[:, 3:] = False  # 8 regions
    tracker = RegionTracker(examples_per_region=4, hamming_sample=300, n_units=12)
    index = np.arange(4000)
    for start in range(0, 4000, 700):
        tracker.update(pack_bits(torch.from_numpy(bits[start : start + 700])), index[start : start + 700])
    assert tracker.n_regions == 8 and sum(tracker.counts.values()) == 4000
    assert all(len(tracker.examples(r)) == 4 for r in tracker.counts)
    kept = np.array([e for r in tracker.counts for e in tracker.examples(r)])
    assert kept.mean() > 1000  # uniform over the stream, not the first tokens
    assert tracker.code_sample().shape == (300, 2)
    stats = tracker.hamming_stats()
    assert 1.0 < stats["mean"] < 2.0  # three fair bits: 1.5 on average


def test_example_reservoir_covers_only_tokens_with_contexts():
    bits = np.zeros((600, 8), dtype=bool)
    bits[::2, 0] = True  # two regions, 300 tokens each
    packed = pack_bits(torch.from_numpy(bits))
    tracker = RegionTracker(examples_per_region=3, hamming_sample=0, seed=1)
    tracker.update(packed[:400])  # no contexts: counted, never examples
    tracker.update(packed[400:], contexts=list(range(400, 600)))
    assert sorted(tracker.counts.values()) == [300, 300] and tracker.n_tokens == 600
    for region in tracker.counts:
        examples = tracker.examples(region)
        assert len(examples) == 3 and all(400 <= e < 600 for e in examples)


def test_sampling_examples_does_not_merge_counts_every_batch(monkeypatch):
    merges = []
    real_merge = RegionCounts._merge
    monkeypatch.setattr(RegionCounts, "_merge", lambda self: (merges.append(1), real_merge(self))[1])
    tracker = RegionTracker(examples_per_region=2, hamming_sample=0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):  # 20 batches of 100 distinct regions: far below the merge buffer
        tracker.update(pack_signs(torch.randn(100, 64, generator=gen)), contexts=list(range(100)))
    assert not merges
    assert tracker.n_regions == 2000 and len(merges) == 1


def test_tracker_ignores_tokens_and_counts_labels(relu_model, data_tokens):
    labels = np.arange(97) % 4
    labels[7] = -1
    tracker, sample = track_regions(
        relu_model, [data_tokens], 0, ignore_tokens=[3], token_labels=labels, sample_hook="blocks.0.mlp.hook_in", sample_size=50
    )
    kept = data_tokens[data_tokens != 3]
    assert tracker.n_tokens == kept.numel()
    assert sum(tracker.label_counts.values()) == int((kept != 7).sum())
    assert sample.activations.shape == (50, 32) and (sample.token_ids != 3).all()
    assert set(sample.region_ids.tolist()) <= set(tracker.counts)


# ---- purity --------------------------------------------------------------------------------


def test_purity_of_perfect_and_random_labellings():
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 20, 5000)
    assert purity(clusters, clusters % 3) == 1.0
    labels = rng.choice(3, size=5000, p=[0.5, 0.3, 0.2])
    report = purity_report(clusters, labels, min_size=5, n_shuffles=5)
    majority = float(np.bincount(labels).max() / labels.size)
    assert report.majority_rate == pytest.approx(majority)
    assert report.purity == pytest.approx(majority, abs=0.03)
    assert report.shuffled_purity == pytest.approx(report.purity, abs=0.03)


def test_purity_report_exposes_singleton_inflation():
    labels = np.random.default_rng(1).integers(0, 4, 600)
    singletons = np.arange(600)
    singletons[:300] = 0  # one big mixed cluster + 300 singletons
    report = purity_report(singletons, labels, min_size=2)
    assert report.n_clusters == 301 and report.n_clusters_min_size == 1
    assert report.covered_fraction == pytest.approx(0.5)
    assert report.purity > 0.6 and report.weighted_purity < 0.35
    assert report.shuffled_purity == pytest.approx(report.purity, abs=0.03)
    unlabelled = labels.copy()
    unlabelled[:100] = -1
    assert purity_report(singletons, unlabelled).n_tokens == 500


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 6)) * 10
    truth = rng.integers(0, 4, 400)
    x = centres[truth] + rng.normal(size=(400, 6)) * 0.1
    assignment, centroids = kmeans(x, 4, seed=0)
    assert purity(assignment, truth) == 1.0 and centroids.shape == (4, 6)
    assert np.array_equal(kmeans(x, 4, seed=0)[0], assignment)
    assert np.unique(kmeans(x[:5], 10)[0]).size == 5  # k capped at the distinct points


def test_compare_purity_uses_the_same_k():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(300, 8))
    regions = (acts[:, :3] > 0) @ np.array([1, 2, 4])
    labels = (acts[:, 0] > 0).astype(int)
    result = compare_purity(acts, regions, labels, min_size=3)
    assert result.k == 8 and result.kmeans.n_clusters <= 8
    assert result.regions.purity == 1.0  # the label is one of the region's bits
    assert result.regions.shuffled_purity < 0.8


# ---- command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, small_tokenizer):
    tok = small_tokenizer
    cfg = ModelConfig(d_vocab=len(tok), d_model=32, n_layers=2, n_heads=4, d_mlp=64, n_ctx=32, mlp_kind="relu")
    root = tmp_path_factory.mktemp("polytope")
    path = build_model(cfg, tokenizer=tok).save_pretrained(root / "m")
    text = root / "stories.txt"
    text.write_text("\n\n".join(synthetic_stories(10, seed=1)), encoding="utf-8")  # blank lines: documents
    return path, text


def test_cli_prints_region_table(saved_model, capsys):
    path, text = saved_model
    assert polytope_main(["--checkpoint", str(path), "--layer", "1", "--text-file", str(text), "--max-tokens", "400"]) == 0
    out = capsys.readouterr().out
    for heading in ("distinct regions", "tokens per region", "most common regions", "mean Hamming", "k-means, sample"):
        assert heading in out


def test_cli_json_is_consistent(saved_model, capsys):
    path, text = saved_model
    argv = ["--checkpoint", str(path), "--text-file", str(text), "--max-tokens", "300", "--json", "--top", "3",
            "--device", "cpu", "--dtype", "float64", "--quiet"]
    assert polytope_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["hooks"] == ["blocks.0.mlp.hook_pre"] and result["n_units"] == 64
    # BOS is not counted, nor the first --warmup positions of rows that start mid-document
    assert result["tokens"] == 300 - result["tokens_skipped_row_start"] and result["tokens_beyond_max"] > 0
    assert 1 <= result["distinct_regions"] <= 300 and len(result["most_common"]) == 3
    purity = result["purity"]
    assert purity["n_tokens"] == result["tokens"] and purity["n_labelled"] == purity["all_labelled"]["n_tokens"] <= 300
    sample = purity["sample"]
    # default k: as many clusters as the sample's regions, at most one per --min-size labelled tokens
    n_sample = sample["regions"]["n_tokens"]
    assert sample["k"] == min(sample["regions"]["n_clusters"], n_sample // 5) >= sample["kmeans"]["n_clusters"]
    assert n_sample / sample["kmeans"]["n_clusters"] >= 5


def test_cli_on_a_short_text_picks_a_small_k_and_warns(saved_model, tmp_path, capsys):
    """Before: 74 labelled tokens in 74 regions gave k = 74 and every purity 1.000 (and
    shuffled 1.000), next to a 'tokens' count that was not the labelled tokens'."""
    path, _ = saved_model
    text = tmp_path / "short.txt"
    text.write_text(synthetic_stories(1, seed=3)[0], encoding="utf-8")
    argv = ["--checkpoint", str(path), "--text-file", str(text), "--quiet"]
    assert polytope_main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    purity = json.loads(out)["purity"]
    n_sample, k = purity["sample"]["regions"]["n_tokens"], purity["sample"]["k"]
    assert 10 <= n_sample < 60 and k == min(purity["sample"]["regions"]["n_clusters"], n_sample // 5)
    assert purity["sample"]["kmeans"]["n_clusters"] <= k < n_sample
    assert purity["sample"]["kmeans"]["purity"] < 1.0  # no longer one token per cluster
    warned = "warning: no region holds --min-size 5 or more labelled tokens" in err
    assert warned == (purity["all_labelled"]["n_clusters_min_size"] == 0), err
    assert polytope_main(argv) == 0
    table = capsys.readouterr().out
    n_tokens, n_labelled = purity["n_tokens"], purity["n_labelled"]
    assert f"{n_labelled} of the {n_tokens} tokens carry one" in table and "regions, all labelled" in table
    (header,) = [line for line in table.splitlines() if "clusters" in line and "shuffled" in line]
    assert header.split()[0] == "labelled"  # the purity rows count labelled tokens, and say so
    # too few labelled tokens for k-means: skipped, said so, and no k-means row
    assert polytope_main([*argv, "--min-size", str(n_sample // 2 + 1)]) == 0
    table = capsys.readouterr().out
    assert "k-means comparison skipped: the sample holds" in table and "k-means, sample" not in table


def test_count_mask_skips_row_starts_mid_document_and_the_overlap():
    from bilinear_lens.data.packing import count_mask

    B = 0
    rows = torch.tensor([[B, 5, 6, 7, 8, 9], [5, 6, 7, B, 8, 9], [5, 6, 7, 8, 9, 5], [6, 7, 8, 9, 5, 6]])
    mask = count_mask(rows, B, warmup=2, overlap=3).int().tolist()
    assert mask[0] == [1] * 6  # row 0: start of the stream
    assert mask[1] == [0, 0, 1, 1, 1, 1]  # mid-document: first 2 positions skipped
    assert mask[2] == [0, 0, 1, 1, 1, 1]
    assert mask[3] == [0, 0, 0, 1, 1, 1]  # last row: its 3 repeated tokens were counted in the row before
    assert count_mask(torch.tensor([[B, 1], [1, B]]), B, warmup=5).int().tolist() == [[1, 1], [0, 1]]  # up to BOS
    assert count_mask(rows, B, warmup=0).all()


def test_cli_packs_documents_with_bos_only_at_document_starts(saved_model, tmp_path):
    """Before: one token stream cut every n_ctx - 1 tokens with a BOS in front of every row;
    blank lines were no document breaks. Now: training's packing (document_stream + stream_rows)."""
    from types import SimpleNamespace

    from bilinear_lens.commands.common import load_model_with_tokenizer
    from bilinear_lens.commands.polytope import _token_rows
    from bilinear_lens.data.documents import split_text

    path, _ = saved_model
    model = load_model_with_tokenizer(str(path), "polytope")
    tok, n_ctx = model.tokenizer, model.cfg.n_ctx
    docs = synthetic_stories(5, seed=4)
    text = tmp_path / "docs.txt"
    text.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
    rows, mask, counts = _token_rows(model, split_text(text.read_text(), "paragraph"), 10**6, 4, "docs.txt")
    doc_ids = [tok.encode(d, add_special_tokens=False) for d in docs]
    stream = [t for ids in doc_ids for t in [tok.bos_token_id, *ids]]
    assert rows.shape[1] == n_ctx and rows.shape[0] == -(-len(stream) // n_ctx)
    n_full = len(stream) // n_ctx
    assert rows[:n_full].reshape(-1).tolist() == stream[: n_full * n_ctx]  # no BOS per row, nothing padded
    assert (rows == tok.bos_token_id).sum() >= len(docs)  # one BOS per document (the last row may repeat one)
    assert int((rows[:n_full] == tok.bos_token_id).sum()) == stream[: n_full * n_ctx].count(tok.bos_token_id)
    n_text = sum(map(len, doc_ids))
    assert counts["tokens_read"] == n_text and counts["tokens_beyond_max"] == 0
    counted = mask & (rows != tok.bos_token_id)
    assert int(counted.sum()) == n_text - counts["tokens_skipped_row_start"]
    # no row-start token of a mid-document row is counted
    for row, keep in zip(rows.tolist()[1:], mask.tolist()[1:]):
        if row[0] != tok.bos_token_id:
            first_bos = row.index(tok.bos_token_id) if tok.bos_token_id in row else n_ctx
            assert not any(keep[: min(4, first_bos)])


def test_cli_reports_the_max_tokens_cap_and_skipped_tokens(saved_model, capsys):
    path, text = saved_model
    argv = ["--checkpoint", str(path), "--text-file", str(text), "--quiet", "--device", "cpu"]
    assert polytope_main([*argv, "--json", "--max-tokens", "10000000"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["tokens_beyond_max"] == 0 and whole["tokens"] == whole["tokens_read"] - whole["tokens_skipped_row_start"]
    assert polytope_main([*argv, "--max-tokens", "250", "--warmup", "3"]) == 0
    out = capsys.readouterr().out
    n_read = whole["tokens_read"]
    assert f"read; {n_read - 250} beyond --max-tokens 250 not run (capped)" in out
    assert "skipped (first --warmup 3 positions of rows starting mid-document)" in out
    assert "w>=5: size-weighted purity of the regions" in out and "covered: share of labelled tokens" in out
    assert polytope_main([*argv, "--json", "--max-tokens", "250", "--warmup", "0"]) == 0
    capped = json.loads(capsys.readouterr().out)
    assert capped["tokens"] == 250 and capped["tokens_skipped_row_start"] == 0


def test_cli_help_explains_the_purity_columns(capsys):
    with pytest.raises(SystemExit):
        polytope_main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "w>=N = purity over clusters of at least N = --min-size tokens" in help_text
    assert "covered = fraction of the labelled tokens in those clusters" in help_text
    assert "--warmup" in help_text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--checkpoint": "missing"}, "cannot load checkpoint"),
        ({"--text-file": "missing.txt"}, "text file not found"),
        ({"--layer": "5"}, "out of range"),
        ({"--device": "tpu"}, "--device 'tpu' is not one of auto, cpu, cuda, cuda:N"),
        ({"--min-size": "0"}, "--min-size must be >= 1, got 0"),
        ({"--max-tokens": "0"}, "--max-tokens must be >= 1, got 0"),
        ({"--batch-size": "0"}, "--batch-size must be >= 1, got 0"),
        ({"--context": "-3"}, "--context must be >= 1, got -3"),
        ({"--top": "0"}, "--top must be >= 1, got 0"),
        ({"--top": "-2"}, "--top must be >= 1, got -2"),
        ({"--examples": "-1"}, "--examples must be >= 0, got -1"),
        ({"--warmup": "-1"}, "--warmup must be >= 0, got -1"),
    ],
)
def test_cli_errors_exit_2(saved_model, capsys, tmp_path, change, message):
    path, text = saved_model
    args = {"--checkpoint": str(path), "--text-file": str(text), "--layer": "0"}
    args.update({k: str(tmp_path / v) if k in ("--checkpoint", "--text-file") else v for k, v in change.items()})
    assert polytope_main([x for kv in args.items() for x in kv]) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_dtype_is_refused_by_the_parser(saved_model, capsys):
    path, text = saved_model
    with pytest.raises(SystemExit) as done:
        polytope_main(["--checkpoint", str(path), "--text-file", str(text), "--dtype", "int8"])
    assert done.value.code == 2
    assert "argument --dtype: invalid choice: 'int8' (choose from 'float32', 'float64', 'bfloat16', 'float16')" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cli_runs_in_half_precision(saved_model, capsys, dtype):
    """polytope offers every model dtype: codes are signs, k-means runs on float32 copies."""
    path, text = saved_model
    argv = ["--checkpoint", str(path), "--text-file", str(text), "--max-tokens", "200", "--json", "--quiet",
            "--device", "cpu"]
    assert polytope_main(argv) == 0
    full = json.loads(capsys.readouterr().out)
    assert polytope_main([*argv, "--dtype", dtype]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["tokens"] == full["tokens"] == 200 - full["tokens_skipped_row_start"] and half["purity"]["n_labelled"] == full["purity"]["n_labelled"]
    assert half["purity"]["sample"]["kmeans"]["n_tokens"] == full["purity"]["sample"]["kmeans"]["n_tokens"]


def test_purity_analysis_script_runs(saved_model, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    from analysis.polytope_purity import main as analysis_main

    path, text = saved_model
    out = tmp_path / "out"
    analysis_main(
        ["--checkpoint", str(path), "--out", str(out), "--text-file", str(text), "--layers", "0",
         "--max-tokens", "300", "--purity-tokens", "200", "--n-paths", "1", "--n-steps", "16",
         "--warmup", "0"]  # count every token run (the CLI's packing; row-start skipping off)
    )
    table = (out / "purity.md").read_text()
    assert "| 0 | regions (sample) |" in table and "| 0 | k-means (sample) |" in table
    assert "| 0 | k-means on codes (sample) |" in table
    sample = json.loads((out / "results.json").read_text())["layers"][0]["sample"]
    assert sample["code_kmeans"]["n_tokens"] == sample["kmeans"]["n_tokens"]  # the same labelled tokens
    assert sample["code_kmeans"]["n_clusters"] <= sample["k"]
    assert (out / "boundary_density.png").stat().st_size > 0
    assert json.loads((out / "results.json").read_text())["layers"][0]["tokens"] == 300


# ---- scale-out: torchrun ranks split the batches, region tables merge ----------------------

_RANK_SCRIPT = '''
import json, sys
import numpy as np, torch
from bilinear_lens.activations.polytope import track_regions
from bilinear_lens.distributed import process_group
from bilinear_lens.models.model import build_model
from tests.conftest import tiny_config

model = build_model(tiny_config(mlp_kind="relu")).eval()
tokens = torch.randint(0, 97, (10, 12), generator=torch.Generator().manual_seed(1))
with process_group(torch.device("cpu")) as ranks:
    tracker, _ = track_regions(model, tokens.split(2), layers=[0, 1], token_labels=np.arange(97) % 5,
                               examples_per_region=0, progress=False)
    if ranks.is_main:
        ids, counts = tracker._regions.ids_and_counts()
        json.dump({"ids": [str(i) for i in ids.tolist()], "counts": counts.tolist(), "n_tokens": tracker.n_tokens,
                   "labels": sorted([str(r), l, c] for (r, l), c in tracker.label_counts.items())}, open(sys.argv[1], "w"))
'''


def test_two_process_track_regions_matches_one_process(tmp_path):
    """torchrun, 2 gloo ranks: batches split round-robin; merged counts equal one process'."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    script = tmp_path / "rank_script.py"
    script.write_text(_RANK_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    out = tmp_path / "regions.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())

    model = build_model(tiny_config(mlp_kind="relu")).eval()  # the script's model, tokens and settings
    tokens = torch.randint(0, 97, (10, 12), generator=torch.Generator().manual_seed(1))
    tracker, _ = track_regions(model, tokens.split(2), layers=[0, 1], token_labels=np.arange(97) % 5,
                               examples_per_region=0, progress=False)
    ids, counts = tracker._regions.ids_and_counts()
    assert tracker.n_tokens == 120 and two["n_tokens"] == 120
    assert two["ids"] == [str(i) for i in ids.tolist()] and two["counts"] == counts.tolist()
    assert two["labels"] == sorted([str(r), l, c] for (r, l), c in tracker.label_counts.items())
