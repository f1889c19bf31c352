"""The sae-tiny recipe on the tiny model, from the CLI: held-out explained variance > 0.8
(the issue's bar; measured 0.955, see NOTES)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bilinear_lens.cli import main
from bilinear_lens.training.config import load_run_config
from bilinear_lens.training.loop import train

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"


@pytest.mark.slow
def test_sae_tiny_recipe_reconstructs_held_out_activations(tmp_path, capsys):
    cache = f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"
    result = train(load_run_config(CONFIGS / "tiny.toml", [cache]), tmp_path / "tiny", progress=False)
    rc = main(["sae", "train", "--checkpoint", str(result.final_checkpoint), "--hook", "blocks.0.hook_resid_mid",
               "--config", str(CONFIGS / "sae-tiny.toml"), "--set", cache, "--out", str(tmp_path / "l0in"),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "l0in" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["step"] == 400 and final["val_explained_variance"] > 0.8
    assert final["val_l0"] <= 30 and final["dead_fraction"] < 0.5
