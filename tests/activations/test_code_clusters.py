"""k-means on spline codes (issue #25 item 6): the library (``activations/code_clusters``,
``activations/kmeans``) and ``bilinear-lens polytope --kmeans K``."""

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch

import bilinear_lens.commands.polytope as polytope_command
from bilinear_lens.activations.code_clusters import cluster_codes, unpacked_codes
from bilinear_lens.activations.kmeans import kmeans
from bilinear_lens.activations.polytope import purity
from bilinear_lens.activations.spline_codes import hamming, pack_bits, region_ids
from bilinear_lens.commands.polytope import region_warnings
from bilinear_lens.data.synthetic import synthetic_stories


def _planted(n_groups=4, per_group=50, n_units=200, flip=0.05, seed=0):
    """Codes scattered around ``n_groups`` random prototype codes, each bit flipped with prob ``flip``."""
    rng = np.random.default_rng(seed)
    prototypes = rng.random((n_groups, n_units)) < 0.5
    truth = np.repeat(np.arange(n_groups), per_group)
    bits = prototypes[truth] ^ (rng.random((truth.size, n_units)) < flip)
    return pack_bits(torch.from_numpy(bits)).numpy(), bits, truth, prototypes


# ---- the library ------------------------------------------------------------------------------


def test_squared_distance_of_unpacked_codes_is_hamming_distance():
    packed, bits, _, _ = _planted(n_units=77)  # 77: the last byte is partly padding
    assert np.array_equal(unpacked_codes(packed, 77), bits)
    x = bits.astype(np.float64)
    squared = ((x[:, None, :] - x[None, :20, :]) ** 2).sum(-1)
    by_popcount = hamming(torch.from_numpy(packed)[:, None, :], torch.from_numpy(packed)[None, :20, :]).numpy()
    assert np.array_equal(squared, by_popcount)


def test_planted_groups_are_recovered_with_their_prototypes_as_majority_codes():
    packed, bits, truth, prototypes = _planted()
    clusters = cluster_codes(packed, 200, 4, seed=0)
    assert clusters.n_clusters == 4 and clusters.n_tokens == 200
    assert purity(clusters.assignment, truth) == 1.0 and purity(truth, clusters.assignment) == 1.0
    # each cluster's majority code is its group's prototype (50 members, 5% flips: 25 flips of one bit never happen)
    for group in range(4):
        cluster = int(np.bincount(clusters.assignment[truth == group]).argmax())
        assert np.array_equal(clusters.majority_codes[cluster], prototypes[group])
    brute = (bits != clusters.majority_codes[clusters.assignment]).sum(1)
    assert np.array_equal(clusters.distance_to_centre, brute)
    assert clusters.mean_distance_to_centre == pytest.approx(brute.mean(), abs=0)  # integers: exact mean
    summary = clusters.as_dict()
    assert summary["tokens_per_cluster"] == {"mean": 50.0, "median": 50.0, "max": 50, "singleton_clusters": 0}
    assert summary["mean_fraction_to_centre"] == clusters.mean_distance_to_centre / 200


def test_majority_code_minimises_the_summed_hamming_distance():
    rng = np.random.default_rng(1)
    bits = rng.random((9, 8)) < 0.5  # 2^8 candidate codes: check all of them
    clusters = cluster_codes(pack_bits(torch.from_numpy(bits)).numpy(), 8, 1)
    candidates = np.array(list(itertools.product([False, True], repeat=8)))
    totals = (bits[None, :, :] != candidates[:, None, :]).sum((1, 2))
    assert clusters.distance_to_centre.sum() == totals.min()
    assert np.array_equal(clusters.majority_codes[0], bits.sum(0) * 2 >= 9)


def test_tokens_of_one_region_share_a_cluster_and_k_is_capped_at_distinct_codes():
    rng = np.random.default_rng(2)
    distinct = rng.random((30, 40)) < 0.5
    bits = distinct[rng.integers(0, 30, 300)]  # 300 tokens in at most 30 regions
    packed = pack_bits(torch.from_numpy(bits)).numpy()
    regions = region_ids(packed)
    clusters = cluster_codes(packed, 40, 6, seed=3)
    for region in np.unique(regions):
        assert np.unique(clusters.assignment[regions == region]).size == 1
    n_regions = np.unique(regions).size
    capped = cluster_codes(packed, 40, 1000)
    assert capped.n_clusters == n_regions and capped.k == 1000
    assert capped.mean_distance_to_centre == 0.0  # one region per cluster: every code is its majority code


def test_cluster_codes_is_deterministic_and_seeded():
    packed, _, _, _ = _planted(n_groups=12, per_group=10, flip=0.3, seed=4)
    first = cluster_codes(packed, 200, 12, seed=5)
    assert np.array_equal(first.assignment, cluster_codes(packed, 200, 12, seed=5).assignment)
    # ids are dense: every cluster id in 0 .. n_clusters - 1 holds a token
    assert set(first.assignment.tolist()) == set(range(first.n_clusters))


def test_kmeans_result_is_a_lloyd_fixed_point_in_float32_and_float64():
    """At convergence every point is at its nearest centroid and every centroid is its points' mean;
    on 0/1 codes all distances are small integers, exact in both precisions, so both agree."""
    _, bits, _, _ = _planted(n_groups=6, per_group=30, flip=0.2, seed=6)
    a32, c32 = kmeans(bits.astype(np.float32), 6, seed=0)
    a64, c64 = kmeans(bits.astype(np.float64), 6, seed=0)
    assert np.array_equal(a32, a64) and c32.dtype == np.float32 and c64.dtype == np.float64
    x = bits.astype(np.float64)
    distances = ((x[:, None, :] - c64[None]) ** 2).sum(-1)
    assert np.array_equal(distances.min(1), distances[np.arange(x.shape[0]), a64])
    for j in np.unique(a64):
        np.testing.assert_allclose(c64[j], x[a64 == j].mean(0), rtol=0, atol=1e-12)  # float64 means of 0/1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda p: cluster_codes(p, 200, 0), "k must be an int >= 1 (clusters), got 0"),
        (lambda p: cluster_codes(p, 200, 2.5), "k must be an int >= 1 (clusters), got 2.5"),
        (lambda p: cluster_codes(p, 100, 3), "codes have 25 bytes per row; n_units=100 needs 13"),
        (lambda p: cluster_codes(p.astype(np.int64), 200, 3), "codes must be packed uint8 rows [n, n_bytes]"),
        (lambda p: cluster_codes(p[:0], 200, 3), "cluster_codes needs at least one code"),
        (lambda p: kmeans(np.zeros(5), 2), "k-means points must be a 2-D array [n, d], got shape (5,)"),
    ],
)
def test_bad_input_names_the_argument_and_value(call, message):
    packed, _, _, _ = _planted()
    with pytest.raises(ValueError) as err:
        call(packed)
    assert message in str(err.value)


# ---- the command ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("kmeans") / "stories.txt"
    path.write_text("\n\n".join(synthetic_stories(10, seed=1)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(saved_checkpoint):
    return saved_checkpoint("small", d_mlp=48, n_ctx=32)


def _run(capsys, argv):
    code = polytope_command.main([*argv, "--quiet", "--device", "cpu"])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_kmeans_clusters_the_purity_sample_and_its_purity_is_the_hand_count(model_dir, text, capsys, monkeypatch):
    seen = {}
    real_track, real_cluster = polytope_command.track_regions, polytope_command.cluster_codes

    def track(*args, **kwargs):
        tracker, sample = real_track(*args, **kwargs)
        seen["sample"] = sample
        return tracker, sample

    def cluster(codes, n_units, k, **kwargs):
        result = real_cluster(codes, n_units, k, **kwargs)
        if k > 1:
            seen["clusters"] = result
        return result

    monkeypatch.setattr(polytope_command, "track_regions", track)
    monkeypatch.setattr(polytope_command, "cluster_codes", cluster)
    code, out, _ = _run(capsys, ["--checkpoint", str(model_dir), "--text-file", str(text), "--kmeans", "8",
                                 "--purity-tokens", "150", "--json"])
    assert code == 0
    result = json.loads(out)
    found, sample, clusters = result["code_clusters"], seen["sample"], seen["clusters"]
    # the sample's codes are the ones its region ids hash, one per sampled token
    assert np.array_equal(region_ids(sample.codes), sample.region_ids) and sample.codes.shape[1] == result["code_bytes"]
    assert found["n_tokens"] == sample.token_ids.size == min(150, result["tokens"])
    assert found["k"] == 8 and 1 <= found["n_clusters"] <= 8 and found["n_units"] == result["n_units"]
    assert found["regions_in_sample"] == np.unique(sample.region_ids).size
    # purity by hand: per cluster, the count of its most common word-class label, over the labelled tokens
    model = polytope_command.load_model_with_tokenizer(str(model_dir), "test")
    labels, _ = polytope_command.word_class_labels(model.tokenizer, model.cfg.d_vocab)
    token_labels = labels[sample.token_ids]
    pairs = Counter((c, l) for c, l in zip(clusters.assignment.tolist(), token_labels.tolist()) if l >= 0)
    best: dict[int, int] = {}
    for (c, _), n in pairs.items():
        best[c] = max(best.get(c, 0), n)
    n_labelled = int((token_labels >= 0).sum())
    assert found["purity"]["n_tokens"] == n_labelled > 0
    assert found["purity"]["purity"] == sum(best.values()) / n_labelled
    assert found["purity"]["n_clusters"] == len(best)
    # the one-cluster baseline is the distance to the sample's majority code
    bits = unpacked_codes(sample.codes, result["n_units"])
    one = (bits != (2 * bits.sum(0) >= bits.shape[0])).sum(1).mean()
    assert found["mean_distance_to_centre_one_cluster"] == one >= found["mean_distance_to_centre"]


def test_cli_kmeans_table_and_its_purity_row(model_dir, text, capsys):
    code, out, _ = _run(capsys, ["--checkpoint", str(model_dir), "--text-file", str(text), "--kmeans", "8"])
    assert code == 0
    assert "  k-means on codes       " in out and "(--kmeans 8) of " in out
    assert "  distance to centre     mean " in out and "one cluster: " in out
    assert "  k-means codes, k=8   " in out  # the purity-table row


def test_cli_kmeans_sets_the_activation_k_unless_k_is_given(model_dir, text, capsys):
    argv = ["--checkpoint", str(model_dir), "--text-file", str(text), "--kmeans", "7", "--json"]
    same = json.loads(_run(capsys, argv)[1])
    assert same["purity"]["sample"]["k"] == 7 == same["code_clusters"]["k"]
    own = json.loads(_run(capsys, [*argv, "--k", "3"])[1])
    assert own["purity"]["sample"]["k"] == 3 and own["code_clusters"]["k"] == 7


def test_cli_kmeans_without_labels_still_clusters(model_dir, text, capsys):
    code, out, _ = _run(capsys, ["--checkpoint", str(model_dir), "--text-file", str(text), "--kmeans", "5",
                                 "--labels", "none", "--json"])
    result = json.loads(out)
    assert code == 0 and result["purity"] is None
    assert result["code_clusters"]["n_clusters"] <= 5 and result["code_clusters"]["purity"] is None


def test_cli_kmeans_is_deterministic(model_dir, text, capsys):
    argv = ["--checkpoint", str(model_dir), "--text-file", str(text), "--kmeans", "6", "--seed", "3", "--json"]
    first, second = (json.loads(_run(capsys, argv)[1])["code_clusters"] for _ in range(2))
    assert first == second


def test_cli_kmeans_more_than_the_sample_is_skipped_with_advice(model_dir, text, capsys):
    code, out, err = _run(capsys, ["--checkpoint", str(model_dir), "--text-file", str(text), "--kmeans", "60",
                                   "--max-tokens", "40", "--warmup", "0", "--json"])
    result = json.loads(out)
    assert code == 0 and result["code_clusters"] is None
    (warning,) = [w for w in result["warnings"] if w.startswith("k-means on codes skipped")]
    assert f"the sample holds {result['tokens']} tokens, fewer than --kmeans 60; lower --kmeans or raise --max-tokens" \
        in warning and f"warning: {warning}" in err


def test_cli_kmeans_with_small_clusters_warns_that_purity_is_inflated(model_dir, text, capsys):
    code, out, _ = _run(capsys, ["--checkpoint", str(model_dir), "--text-file", str(text), "--kmeans", "100",
                                 "--purity-tokens", "150", "--json"])
    result = json.loads(out)
    assert code == 0 and result["code_clusters"]["n_tokens"] < 5 * result["code_clusters"]["n_clusters"]
    assert any(w.startswith("k-means on codes: ") and "average fewer than --min-size 5" in w for w in result["warnings"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--kmeans", "0"], "--kmeans must be >= 1, got 0"),
        (["--kmeans", "-3"], "--kmeans must be >= 1, got -3"),
        (["--kmeans", "3000"], "--kmeans must be at most --purity-tokens 2000 (the sampled tokens it clusters), got 3000"),
    ],
)
def test_cli_bad_kmeans_is_one_line_before_the_model_loads(tmp_path, text, capsys, flags, message):
    missing = tmp_path / "no-such-checkpoint"  # the check comes first, so the missing checkpoint is not reached
    code, out, err = _run(capsys, ["--checkpoint", str(missing), "--text-file", str(text), *flags])
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [f"bilinear-lens polytope: error: {message}"]


def test_the_degeneracy_warning_names_kmeans():
    (warning,) = region_warnings(18_837, 18_840, 2048, tokens_beyond_max=0)
    assert "--kmeans K (k-means on the codes" in warning
