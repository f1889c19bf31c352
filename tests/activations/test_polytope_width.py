"""Polytope at realistic width: the degeneracy warning, codes on a subset of units, Hamming neighbourhoods."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from bilinear_lens.activations.code_subsets import (
    choose_units,
    default_radius,
    nearest_neighbour_hamming,
    subset_codes,
    subset_layout,
)
from bilinear_lens.activations.polytope import track_regions
from bilinear_lens.activations.spline_codes import code_layout, pack_bits, region_ids, spline_codes
from bilinear_lens.commands.polytope import (
    DEGENERATE_REGION_FRACTION,
    is_degenerate,
    main as polytope_main,
    more_text_advice,
    region_warnings,
)
from bilinear_lens.data.synthetic import synthetic_stories
from bilinear_lens.models.config import ModelConfig
from bilinear_lens.models.model import build_model
from conftest import tiny_config


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer):
    return small_tokenizer


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("width") / "stories.txt"
    path.write_text("\n\n".join(synthetic_stories(10, seed=1)), encoding="utf-8")
    return path


def _saved(tokenizer, root, d_mlp, mlp_kind="relu", n_layers=1):
    cfg = ModelConfig(d_vocab=len(tokenizer), d_model=32, n_layers=n_layers, n_heads=4, d_mlp=d_mlp, n_ctx=32,
                      mlp_kind=mlp_kind)
    return build_model(cfg, tokenizer=tokenizer).save_pretrained(root / f"m{d_mlp}{mlp_kind}{n_layers}")


@pytest.fixture(scope="module")
def narrow_model(tokenizer, tmp_path_factory):
    return _saved(tokenizer, tmp_path_factory.mktemp("narrow"), 48, n_layers=2)


@pytest.fixture(scope="module")
def wide_model(tokenizer, tmp_path_factory):
    """d_mlp 256 on ~240 tokens: (nearly) every token its own region, as d_mlp 2048 on 18k tokens."""
    return _saved(tokenizer, tmp_path_factory.mktemp("wide"), 256)


def _json(capsys, argv):
    assert polytope_main([*argv, "--json", "--quiet", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    return json.loads(out), err


# ---- the degeneracy warning and advice that matches the cause ----------------------------------


def test_the_measured_case_is_called_degenerate_and_not_told_to_give_more_text():
    """d_mlp 2048: 18,837 regions for 18,840 tokens, 168k tokens cut by --max-tokens 20000."""
    (warning,) = region_warnings(18_837, 18_840, 2048, tokens_beyond_max=168_000)
    assert warning.startswith("every token is (nearly) its own region (18837 regions for 18840 counted tokens)")
    assert "the code has 2048 units (2^2048 possible regions)" in warning and "more text will not change" in warning
    assert "--units K" in warning and "Hamming neighbourhoods" in warning and "k-means" in warning
    assert "--text-file" not in warning and "--max-tokens" not in warning
    assert is_degenerate(18_837, 18_840, 2048)


def test_short_text_advice_names_the_cut_or_a_longer_file():
    # 4 units: 16 possible regions, 10 tokens in 10 regions -> the text is short, not the code wide
    assert not is_degenerate(10, 10, 3) and is_degenerate(10, 10, 4)
    (cut,) = region_warnings(8, 8, 3, tokens_beyond_max=50)
    assert "because the text is short for the 2^3 possible regions" in cut
    assert cut.endswith("raise --max-tokens (50 tokens were cut)")
    (short,) = region_warnings(8, 8, 3, tokens_beyond_max=0)
    assert short.endswith("give a longer --text-file")
    assert more_text_advice(7) == "raise --max-tokens (7 tokens were cut)"
    assert more_text_advice(0) == "give a longer --text-file"


def test_threshold_is_the_named_fraction():
    n = 1000
    below = int(np.ceil(DEGENERATE_REGION_FRACTION * n)) - 1
    assert region_warnings(below, n, 2048, 0) == [] and not is_degenerate(below, n, 2048)
    assert len(region_warnings(below + 1, n, 2048, 0)) == 1 and is_degenerate(below + 1, n, 2048)
    assert region_warnings(0, 0, 2048, 0) == []


def test_cli_warns_at_width_and_purity_advice_follows_the_cause(wide_model, text, capsys):
    result, err = _json(capsys, ["--checkpoint", str(wide_model), "--text-file", str(text), "--max-tokens", "300"])
    assert result["distinct_regions"] >= DEGENERATE_REGION_FRACTION * result["tokens"]  # the fixture is degenerate
    (warning,) = result["warnings"]
    assert warning.startswith("every token is (nearly) its own region") and f"warning: {warning}" in err
    purity_warnings = result["purity"]["warnings"]
    assert all("--text-file" not in w for w in purity_warnings)  # text was cut, and width is the cause anyway
    assert any(w.endswith("at this width every token is nearly its own region: use --units K or --kmeans K") for w in purity_warnings)
    # the measure that stays meaningful: nearest sampled code
    near = result["hamming_neighbours"]
    assert near["n_sampled"] == result["hamming"]["n_sampled"] and near["radius"] == default_radius(256) == 3
    # every token is sampled here, so "has another sampled token in its region" = "not in a singleton region"
    assert near["n_sampled"] == result["tokens"]
    assert near["same_region"] == pytest.approx(1 - result["tokens_per_region"]["tokens_in_singletons"], abs=1e-12)
    # R >= 0.9 T regions leave at most 2 (T - R) <= 0.2 T tokens in shared regions
    assert near["same_region"] <= near["within_radius"] and near["same_region"] <= 2 * (1 - DEGENERATE_REGION_FRACTION)
    # coarser codes: counts become meaningful and the warning goes
    coarse, _ = _json(capsys, ["--checkpoint", str(wide_model), "--text-file", str(text), "--max-tokens", "300",
                               "--units", "6"])
    assert coarse["warnings"] == [] and coarse["distinct_regions"] <= 2**6 and coarse["n_units"] == 6
    assert polytope_main(["--checkpoint", str(wide_model), "--text-file", str(text), "--max-tokens", "300",
                          "--quiet", "--device", "cpu", "--labels", "none"]) == 0
    table = capsys.readouterr().out
    assert f"  warning: {warning}" in table and "nearest sampled code" in table


def test_cli_cut_text_says_raise_max_tokens_in_purity_warnings(narrow_model, text, capsys):
    result, _ = _json(capsys, ["--checkpoint", str(narrow_model), "--text-file", str(text), "--max-tokens", "120",
                               "--min-size", "60"])
    cut = result["tokens_beyond_max"]
    warnings = result["purity"]["warnings"]
    assert cut > 0 and warnings
    assert all(w.endswith(f"raise --max-tokens ({cut} tokens were cut)") for w in warnings), warnings


# ---- codes on a subset of units ---------------------------------------------------------------


def test_choose_units_is_seeded_sorted_distinct_and_per_layer():
    a = choose_units([0, 1], 48, 5, seed=3)
    assert a.keys() == {0, 1} and all(len(set(u.tolist())) == 5 == u.size and np.all(np.diff(u) > 0) for u in a.values())
    assert all(np.array_equal(a[i], choose_units([0, 1], 48, 5, seed=3)[i]) for i in (0, 1))
    assert np.array_equal(choose_units([1], 48, 5, seed=3)[1], a[1])  # a layer's units do not depend on the others
    assert np.array_equal(choose_units([0], 48, 48)[0], np.arange(48))
    for bad in (0, 49, True):
        with pytest.raises(ValueError, match=rf"units must be an int between 1 and d_mlp=48, got {bad!r}"):
            choose_units([0], 48, bad)


def test_subset_codes_equal_indexing_the_bits():
    model = build_model(tiny_config(mlp_kind="bilinear"))
    tokens = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    layout = code_layout(model, [0, 1])
    units = choose_units([0, 1], 48, 7, seed=1)
    per_hook = {name: units[int(name.split(".")[1])] for name in layout.hook_names}
    packed = spline_codes(model, tokens, [0, 1])
    by_hand = torch.cat([pack_bits(layout.unpack_segment(packed, name)[..., torch.as_tensor(per_hook[name])])
                         for name in layout.hook_names], dim=-1)
    sub = subset_codes(packed, layout, per_hook)
    assert torch.equal(sub, by_hand) and sub.shape == (3, 11, 4)  # 2 layers x 2 factors, 1 byte each
    assert subset_layout(layout, per_hook).n_units == 7 * 4
    assert torch.equal(subset_layout(layout, per_hook).unpack(sub), layout.unpack(packed)[..., torch.as_tensor(
        np.concatenate([per_hook[n] + i * 48 for i, n in enumerate(layout.hook_names)]))])


def test_track_regions_on_few_units_match_region_ids_by_hand():
    model = build_model(tiny_config(mlp_kind="relu"))
    tokens = torch.randint(0, 97, (12, 16), generator=torch.Generator().manual_seed(1))
    k = 3
    units = choose_units([1], 48, k, seed=5)
    layout = code_layout(model, 1)
    tracker, _ = track_regions(model, tokens.split(5), 1, code_units={layout.hook_names[0]: units[1]},
                               progress=False, examples_per_region=0)
    bits = layout.unpack(spline_codes(model, tokens, 1))[..., torch.as_tensor(units[1])]
    by_hand = Counter(region_ids(pack_bits(bits.reshape(-1, k))).tolist())
    assert tracker.counts == by_hand and tracker.n_regions <= 2**k and tracker.n_units == k


def test_cli_all_units_equals_the_default(narrow_model, text, capsys):
    argv = ["--checkpoint", str(narrow_model), "--text-file", str(text), "--max-tokens", "300", "--layer", "0", "1",
            "--top", "5"]
    default, _ = _json(capsys, argv)
    every, _ = _json(capsys, [*argv, "--units", "48"])
    assert every["units"] == {"per_layer": 48, "seed": 0, "layers": {"0": list(range(48)), "1": list(range(48))}}
    assert default["units"] is None
    for key in ("n_units", "code_bytes", "distinct_regions", "tokens_per_region", "most_common", "hamming",
                "hamming_neighbours", "purity", "warnings"):
        assert every[key] == default[key], key


def test_cli_few_units_bound_the_regions_and_list_the_units(narrow_model, text, capsys):
    argv = ["--checkpoint", str(narrow_model), "--text-file", str(text), "--max-tokens", "300", "--layer", "0", "1",
            "--units", "2", "--seed", "4"]
    result, _ = _json(capsys, argv)
    expected = choose_units([0, 1], 48, 2, seed=4)
    assert result["units"]["layers"] == {str(i): expected[i].tolist() for i in (0, 1)}
    assert result["n_units"] == 4 and 1 <= result["distinct_regions"] <= 2**4  # K per layer: 2 x 2 layers


@pytest.mark.parametrize("value", ["0", "49"])
def test_cli_bad_units_exit_2(narrow_model, text, capsys, value):
    argv = ["--checkpoint", str(narrow_model), "--text-file", str(text), "--quiet", "--units", value]
    assert polytope_main(argv) == 2
    assert f"--units must be between 1 and d_mlp=48, got {value}" in capsys.readouterr().err


# ---- Hamming neighbourhoods -----------------------------------------------------------------


def _brute_nearest(bits: np.ndarray) -> np.ndarray:
    n = bits.shape[0]
    return np.array([min(int((bits[i] != bits[j]).sum()) for j in range(n) if j != i) for i in range(n)])


def test_nearest_neighbour_hamming_matches_brute_force():
    rng = np.random.default_rng(0)
    bits = rng.random((40, 37)) < 0.5
    bits[5] = bits[6]  # a shared region
    bits[7] = bits[8]
    bits[7, 3] = ~bits[7, 3]  # one unit apart
    nearest = _brute_nearest(bits)
    for radius in (0, 1, 10, 37):
        stats = nearest_neighbour_hamming(pack_bits(torch.from_numpy(bits)), radius, n_units=37)
        assert stats["n_sampled"] == 40 and stats["radius"] == radius
        assert stats["mean"] == pytest.approx(nearest.mean(), rel=1e-12)  # float64 mean of 40 ints
        assert stats["median"] == np.median(nearest) and stats["mean_fraction"] == pytest.approx(nearest.mean() / 37)
        assert stats["within_radius"] == (nearest <= radius).mean()
        assert stats["same_region"] == (nearest == 0).mean() >= 2 / 40


def test_nearest_neighbour_hamming_edge_cases():
    one = nearest_neighbour_hamming(np.zeros((1, 2), np.uint8), 1, 16)
    assert one["n_sampled"] == 1 and np.isnan(one["mean"]) and np.isnan(one["within_radius"])
    with pytest.raises(ValueError, match="radius must be an int >= 0, got -1"):
        nearest_neighbour_hamming(np.zeros((2, 2), np.uint8), -1, 16)
    assert default_radius(2048) == 20 and default_radius(48) == 1 and default_radius(10) == 1


def test_cli_hamming_radius_is_used(narrow_model, text, capsys):
    argv = ["--checkpoint", str(narrow_model), "--text-file", str(text), "--max-tokens", "200", "--labels", "none"]
    r0, _ = _json(capsys, [*argv, "--hamming-radius", "0"])
    r48, _ = _json(capsys, [*argv, "--hamming-radius", "48"])
    assert r0["hamming_neighbours"]["within_radius"] == r0["hamming_neighbours"]["same_region"]
    assert r48["hamming_neighbours"]["within_radius"] == 1.0 and r48["hamming_neighbours"]["radius"] == 48
    assert polytope_main([*argv, "--hamming-radius", "-1"]) == 2
    assert "--hamming-radius" in capsys.readouterr().err
