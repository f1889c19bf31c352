"""Analysis scripts run end to end on a tiny saved model and write their outputs."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the analysis/ package lives at the repo root

from analysis import eigen_spectra  # noqa: E402
from bilinear_lens.models.model import build_model  # noqa: E402
from bilinear_lens.data.synthetic import synthetic_stories  # noqa: E402
from bilinear_lens.data.tokenizer import to_hf_tokenizer, train_tokenizer  # noqa: E402
from conftest import tiny_config  # noqa: E402


def test_eigen_spectra_writes_table(tmp_path, capsys):
    tok = to_hf_tokenizer(train_tokenizer(synthetic_stories(300, seed=0), vocab_size=300))
    build_model(tiny_config(d_vocab=len(tok), n_ctx=32), tokenizer=tok).save_pretrained(tmp_path / "m")
    assert eigen_spectra.main(["--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "out"),
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
