"""Analysis scripts run end to end on a tiny saved model and write their outputs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the analysis/ package lives at the repo root

from analysis import eigen_spectra  # noqa: E402
from bilinear_lens.models.model import build_model  # noqa: E402
from conftest import tiny_config  # noqa: E402


def test_eigen_spectra_writes_table(tmp_path, capsys, saved_checkpoint):
    assert eigen_spectra.main(["--checkpoint", str(saved_checkpoint(n_ctx=32)), "--out", str(tmp_path / "out"),
                               "--n-tokens", "5", "--max-tokens", "512"]) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    layer0 = results["layers"][0]
    shares = [sum(v) / len(v) for v in layer0["weights_explained"].values()]
    assert shares == sorted(shares) and all(0 <= s <= 1 + 1e-9 for s in shares)
    assert (tmp_path / "out" / "eigen_spectra.png").is_file()
    assert "| layer | k |" in capsys.readouterr().out


def test_eigen_spectra_refuses_non_bilinear(tmp_path):
    build_model(tiny_config(mlp_kind="relu")).save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit, match="needs a bilinear model"):
        eigen_spectra.main(["--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "o")])


def test_sae_low_rank_matches_the_per_direction_reading(tmp_path):
    """analyse() on random SAEs: each live feature's correlations equal those of
    rank_k_correlation_on_tokens for the same FeatureDirection (an independent path)."""
    import torch

    from analysis import sae_low_rank
    from bilinear_lens.activations.eigen_readings import rank_k_correlation_on_tokens
    from bilinear_lens.weights.layer_eigen import layer_eigendecomposition
    from bilinear_lens.sae.config import SAEConfig
    from bilinear_lens.sae.model import SAE, save_sae
    from bilinear_lens.weights.directions import FeatureDirection

    torch.manual_seed(0)
    model = build_model(tiny_config(n_layers=1, dtype="float64"))
    sae = SAE(SAEConfig(d_in=32, d_sae=16, hook_name="blocks.0.hook_resid_post", k=4, dtype="float64"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    save_sae(sae, tmp_path / "sae")
    tokens = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    results = sae_low_rank.analyse(model, [tmp_path / "sae"], tokens, n_tokens=5)
    layer = results["layers"][0]
    live = (sae.feature_acts(model, tokens) > 0).flatten(0, 1).any(0).nonzero().flatten().tolist()
    assert layer["n_live"] == len(live) > 0 and len(layer["tokens"][2]) == 5
    for n, i in enumerate(live[:3]):
        le = layer_eigendecomposition(model, 0, FeatureDirection(sae, i, read="encoder"))
        expected = rank_k_correlation_on_tokens(model, tokens, le, ks=(1, 2, 4))
        for k in (1, 2, 4):
            assert layer["features"][k][n] == pytest.approx(expected[k], abs=1e-9)  # float64 rounding
    assert "| 0 | live SAE features |" in sae_low_rank.markdown(results, "synthetic")
