"""Resume after the corpus moved (issue 25 audit): the missing-corpus error tells the user to
give ``--set data.source=PATH``, so a resume must take a new path whose bytes are the ones
the run recorded (``data_fingerprint.json``) and continue exactly; a file with other bytes or
no file at that path is still refused, with the reason."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bilinear_lens.data.fingerprint import fingerprint_file, read_fingerprint
from bilinear_lens.data.synthetic import synthetic_stories
from bilinear_lens.files.names import DATA_FINGERPRINT_FILE, RUN_CONFIG_FILE, WEIGHTS_FILE
from bilinear_lens.training.config import RunConfig, load_run_config
from bilinear_lens.training.loop import train


def _recipe(cache_dir: Path, source: Path, steps: int = 4) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_mlp": 64, "n_ctx": 16, "seed": 0},
        "data": {"source": str(source), "vocab_size": 300, "val_fraction": 0.2, "cache_dir": str(cache_dir)},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-2, "log_every": 0, "eval_every": 0, "device": "cpu",
                  "num_threads": 1, "checkpoint_every": 2},
    }, where="test recipe")


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / WEIGHTS_FILE))


@pytest.fixture
def stopped(tmp_path):
    """A run stopped at step 2 of 4 on ``A/stories.jsonl``, the file then moved to ``B/``."""
    corpus = tmp_path / "A" / "stories.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps({"text": s}) + "\n" for s in synthetic_stories(120, seed=1)),
                      encoding="utf-8")
    trained = fingerprint_file(corpus)
    out = tmp_path / "run"
    train(_recipe(tmp_path / "cache", corpus), out, progress=False, stop_at=2)
    moved = tmp_path / "B" / "stories.jsonl"
    moved.parent.mkdir()
    shutil.move(corpus, moved)
    return tmp_path, out, moved, trained


def test_resume_on_the_moved_corpus_continues_exactly(stopped, caplog):
    tmp_path, out, moved, trained = stopped
    caplog.set_level(logging.INFO, logger="bilinear_lens")
    recipe = load_run_config(out / RUN_CONFIG_FILE, [f"data.source={json.dumps(str(moved))}"])
    resumed = train(recipe, out, resume=True, progress=False)
    assert resumed.steps == 4 and resumed.finished
    assert any("the corpus moved" in r.getMessage() and str(moved) in r.getMessage() for r in caplog.records)
    # the run now records the new path, with the same bytes
    assert load_run_config(out / RUN_CONFIG_FILE).data.source == str(moved.resolve())
    recorded = read_fingerprint(resumed.final_checkpoint / DATA_FINGERPRINT_FILE)
    assert recorded.path == str(moved.resolve()) and recorded.sha256 == trained.sha256
    # the same weights as a run never interrupted (resume is exact: same batches, same state)
    straight = tmp_path / "A2" / "stories.jsonl"
    straight.parent.mkdir()
    shutil.copyfile(moved, straight)
    whole = train(_recipe(tmp_path / "cache2", straight), tmp_path / "whole", progress=False)
    got, want = _weights(resumed.final_checkpoint), _weights(whole.final_checkpoint)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_on_a_file_with_other_bytes_is_refused_naming_both(stopped):
    tmp_path, out, moved, trained = stopped
    other = tmp_path / "C" / "stories.jsonl"
    other.parent.mkdir()
    other.write_bytes(moved.read_bytes() + b'{"text": "One more story."}\n')
    recipe = load_run_config(out / RUN_CONFIG_FILE, [f"data.source={json.dumps(str(other))}"])
    with pytest.raises(ValueError) as err:
        train(recipe, out, resume=True, progress=False)
    message = str(err.value)
    assert "data.source:" in message and str(other) in message
    assert message.endswith(f"a moved corpus is accepted when its bytes are the ones trained on "
                            f"({trained.describe()}), but {other} holds others ({other.stat().st_size} bytes)")


def test_resume_on_a_missing_path_says_it_is_not_a_file(stopped):
    tmp_path, out, _, _ = stopped
    missing = tmp_path / "nowhere.jsonl"
    recipe = load_run_config(out / RUN_CONFIG_FILE, [f"data.source={json.dumps(str(missing))}"])
    with pytest.raises(ValueError, match=rf"a moved corpus is accepted, but {missing} is not a file$"):
        train(recipe, out, resume=True, progress=False)
    assert read_fingerprint(out / DATA_FINGERPRINT_FILE).path.endswith("A/stories.jsonl")  # nothing rewritten
