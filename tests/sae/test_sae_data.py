"""Which text ``sae train`` trains on (the SAE half of the issue 25 audit): without a
``[data]`` source the SAE reads the model's own recorded training data (the same file,
documents rule and val split), checked against the recorded fingerprint; a checkpoint with
no record falls back to the synthetic stories and says so; one ``SAE text: ...`` line names
the text, and ``sae_recipe.json`` records it, so a resumed run reads the same text."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from bilinear_lens.cli import main
from bilinear_lens.data.fingerprint import find_difference, fingerprint_file
from bilinear_lens.data.synthetic import synthetic_stories
from bilinear_lens.models.model import build_model
from bilinear_lens.sae.model import load_sae
from bilinear_lens.sae.recipe import SOURCE_REMEDY, load_sae_recipe
from bilinear_lens.sae.train import train_sae
from bilinear_lens.training.config import RunConfig, load_run_config
from bilinear_lens.training.loop import train
from bilinear_lens.training.state import read_train_state
from conftest import tiny_config

N_STORIES = 120
# a small SAE run: no --config, so the text is the model's
SMALL = ["sae.expansion=2", "sae.k=4", "train.steps=4", "train.batch_size=4", "train.log_every=2",
         "train.eval_every=2", "train.checkpoint_every=2", "train.num_threads=1", "train.device=\"cpu\""]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _train_run(root: Path) -> tuple[Path, Path]:
    """A tiny model trained from directory ``root/A`` on ``stories.txt`` (relative
    data.source, ``<|endoftext|>`` documents); returns (A, its final checkpoint)."""
    a = root / "A"
    a.mkdir(parents=True)
    (a / "stories.txt").write_text("\n<|endoftext|>\n".join(synthetic_stories(N_STORIES, seed=3)) + "\n",
                                   encoding="utf-8")
    recipe = RunConfig.from_dict({
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_mlp": 64, "n_ctx": 16, "seed": 0},
        "data": {"source": "stories.txt", "vocab_size": 300, "val_fraction": 0.2, "seed": 1,
                 "cache_dir": str(root / "cache")},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-2, "log_every": 0, "eval_every": 0, "device": "cpu",
                  "num_threads": 1},
    }, where="test recipe")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(a)
        result = train(recipe, a / "runs" / "txt", progress=False)
    return a, result.final_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train_run(tmp_path_factory.mktemp("sae_data"))


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The SAE is trained from another working directory (the relative name means nothing there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _text_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("SAE text:")]


def test_without_config_the_sae_trains_on_the_models_recorded_file(trained, elsewhere, caplog, capsys):
    a, ckpt = trained
    corpus = str((a / "stories.txt").resolve())
    with caplog.at_level(logging.INFO):
        rc = main(["sae", "train", "--checkpoint", str(ckpt), "--out", str(elsewhere / "s"), "--no-progress",
                   *_sets(SMALL)])
    assert rc == 0, capsys.readouterr().err
    assert _text_lines(caplog) == [f"SAE text: the model's training data ({corpus}, documents: endoftext), "
                                   f"{N_STORIES} documents"]
    saved = json.loads((elsewhere / "s" / "sae_recipe.json").read_text())
    assert saved["data_origin"] == "model" and saved["data"]["source"] == corpus
    # the model's [data] (its documents, split, val_fraction and seed: the SAE's val blocks are
    # the model's val documents), read with the checkpoint's tokenizer
    model_data = load_run_config(ckpt / "run_config.toml").data
    assert saved["data"] == {**dataclasses.asdict(model_data), "tokenizer": ""}
    assert load_sae(elsewhere / "s").cfg.metadata["dataset_path"] == corpus


def test_a_config_without_source_and_the_python_api_use_the_models_data_too(trained, elsewhere, caplog):
    a, ckpt = trained
    config = elsewhere / "sae.toml"
    config.write_text("[sae]\nk = 4\nexpansion = 2\n[data]\nmax_docs = 100\n", encoding="utf-8")
    recipe = load_sae_recipe(config, SMALL[2:])
    with caplog.at_level(logging.INFO, logger="bilinear_lens.sae.train"):
        train_sae(ckpt, elsewhere / "s", recipe, progress=False)
    assert _text_lines(caplog) == [f"SAE text: the model's training data ({(a / 'stories.txt').resolve()}, "
                                   "documents: endoftext), 100 documents"]  # the recipe's max_docs on top
    saved = json.loads((elsewhere / "s" / "sae_recipe.json").read_text())
    assert saved["data"]["max_docs"] == 100 and saved["data"]["val_fraction"] == 0.2 and saved["data"]["seed"] == 1


def test_a_checkpoint_with_no_record_falls_back_to_synthetic_and_says_so(elsewhere, small_tokenizer, caplog, capsys):
    torch.manual_seed(0)
    build_model(tiny_config(d_vocab=len(small_tokenizer), n_layers=1), tokenizer=small_tokenizer).save_pretrained(
        elsewhere / "m")
    sets = SMALL + ["data.max_docs=300", f"data.cache_dir={json.dumps(str(elsewhere / 'cache'))}"]
    with caplog.at_level(logging.INFO):
        rc = main(["sae", "train", "--checkpoint", str(elsewhere / "m"), "--out", str(elsewhere / "s"),
                   "--no-progress", *_sets(sets)])
    assert rc == 0, capsys.readouterr().err
    [line] = _text_lines(caplog)
    assert line == ("SAE text: synthetic stories (fallback, data.seed 0), 300 documents [the checkpoint records no "
                    "training data (no run_config.toml), so the SAE trains on the built-in synthetic stories; "
                    f"{SOURCE_REMEDY}]")
    assert [r.levelno for r in caplog.records if r.getMessage() == line] == [logging.WARNING]
    saved = json.loads((elsewhere / "s" / "sae_recipe.json").read_text())
    assert saved["data_origin"] == "fallback" and saved["data"]["source"] == "synthetic"


def test_a_recipe_source_is_used_and_named_as_not_the_models(trained, elsewhere, caplog, capsys):
    _, ckpt = trained
    sets = SMALL + ["data.source=\"synthetic\"", "data.max_docs=300",
                    f"data.cache_dir={json.dumps(str(elsewhere / 'cache'))}"]
    with caplog.at_level(logging.INFO):
        rc = main(["sae", "train", "--checkpoint", str(ckpt), "--out", str(elsewhere / "s"), "--no-progress",
                   *_sets(sets)])
    assert rc == 0, capsys.readouterr().err
    [line] = _text_lines(caplog)
    assert line.startswith("SAE text: synthetic stories (recipe data.source, data.seed 0), 300 documents [not the "
                           "model's training data, ") and line.endswith("stories.txt (data.source in its run_config.toml)]")


def _own_run(root: Path) -> tuple[Path, Path]:
    """A run of this test's own (the tests below change its file): (checkpoint, corpus)."""
    a, ckpt = _train_run(root)
    return ckpt, (a / "stories.txt").resolve()


def test_a_changed_or_missing_training_file_is_one_line_naming_the_fix(elsewhere, capsys):
    ckpt, corpus = _own_run(elsewhere / "own")
    trained_print = fingerprint_file(corpus)
    corpus.write_text(corpus.read_text(encoding="utf-8") + "One more story.\n", encoding="utf-8")
    differs = find_difference(trained_print, corpus)
    args = ["sae", "train", "--checkpoint", str(ckpt), "--no-progress", *_sets(SMALL)]
    assert main([*args, "--out", str(elsewhere / "s1")]) == 2
    err = capsys.readouterr().err
    assert err == (f"bilinear-lens sae: error: the model was trained on {corpus} ({trained_print.describe()}); the "
                   f"file there now differs ({differs.describe()}): give the SAE's text with --set data.source=PATH\n")
    corpus.unlink()
    assert main([*args, "--out", str(elsewhere / "s2")]) == 2
    err = capsys.readouterr().err
    assert err == (f"bilinear-lens sae: error: the model was trained on {corpus} (data.source in its "
                   "run_config.toml), which is not found from here; give the SAE's text with --set data.source=PATH\n")
    assert not (elsewhere / "s1" / "sae_recipe.json").exists() and not (elsewhere / "s2" / "final").exists()


def test_resume_of_a_model_data_run_keeps_its_text_and_rechecks_the_file(elsewhere, caplog, capsys):
    ckpt, corpus = _own_run(elsewhere / "own")
    out = elsewhere / "s"
    args = ["sae", "train", "--checkpoint", str(ckpt), "--out", str(out), "--no-progress"]
    assert main([*args, *_sets(SMALL), "--stop-at", "2"]) == 0, capsys.readouterr().err
    before = json.loads((out / "sae_recipe.json").read_text())
    config = elsewhere / "sae.toml"  # a config without source, given on resume: resolves to the same [data]
    config.write_text("[sae]\nk = 4\nexpansion = 2\n", encoding="utf-8")
    with caplog.at_level(logging.INFO):
        assert main([*args, "--resume", "--config", str(config), *_sets(SMALL[2:]), "--stop-at", "3"]) == 0, \
            capsys.readouterr().err
        assert main(["sae", "train", "--out", str(out), "--resume", "--no-progress"]) == 0, capsys.readouterr().err
    line = f"SAE text: the model's training data ({corpus}, documents: endoftext), {N_STORIES} documents"
    assert _text_lines(caplog) == [line, line]
    after = json.loads((out / "sae_recipe.json").read_text())
    assert after["data"] == before["data"] and after["data_origin"] == "model"
    assert read_train_state(out / "final").step == 4
    # the saved recipe's file changed since: the resume is refused in one line
    corpus.write_text(corpus.read_text(encoding="utf-8") + "One more story.\n", encoding="utf-8")
    assert main(["sae", "train", "--out", str(out), "--resume", "--no-progress", "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the file there now differs" in err and "--set data.source=PATH" in err


def test_the_models_file_moved_is_taken_as_the_models_data_fresh_and_on_resume(elsewhere, caplog, capsys):
    """The missing-file error says ``--set data.source=PATH``; a path holding the recorded bytes
    is the model's data moved: a fresh run reads it with the model's [data], a stopped run
    resumes on it (its saved source was the old path), and a path with other bytes is refused."""
    ckpt, corpus = _own_run(elsewhere / "own")
    moved = elsewhere / "moved" / "stories.txt"
    moved.parent.mkdir()
    corpus.rename(moved)
    model_data = load_run_config(ckpt / "run_config.toml").data
    fresh = ["sae", "train", "--checkpoint", str(ckpt), "--no-progress", *_sets(SMALL)]
    with caplog.at_level(logging.INFO):
        assert main([*fresh, "--out", str(elsewhere / "s"), "--set", f"data.source={json.dumps(str(moved))}"]) == 0, \
            capsys.readouterr().err
    assert _text_lines(caplog) == [f"SAE text: the model's training data ({moved}, documents: endoftext), "
                                   f"{N_STORIES} documents [the model's training file, moved from {corpus}]"]
    saved = json.loads((elsewhere / "s" / "sae_recipe.json").read_text())
    assert saved["data_origin"] == "model"
    assert saved["data"] == {**dataclasses.asdict(model_data), "tokenizer": "", "source": str(moved)}

    # a run stopped on the old path, resumed on the moved file
    moved.rename(corpus)
    out = elsewhere / "r"
    assert main([*fresh, "--out", str(out), "--stop-at", "2"]) == 0, capsys.readouterr().err
    corpus.rename(moved)
    resume = ["sae", "train", "--out", str(out), "--resume", "--no-progress"]
    assert main(resume) == 2
    assert "--set data.source=PATH" in capsys.readouterr().err
    other = elsewhere / "other.txt"
    other.write_text(moved.read_text(encoding="utf-8") + "One more story.\n", encoding="utf-8")
    assert main([*resume, "--set", f"data.source={json.dumps(str(other))}"]) == 2
    assert f"{other} differs" in capsys.readouterr().err  # checked against the model's recorded bytes
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*resume, "--set", f"data.source={json.dumps(str(moved))}"]) == 0, capsys.readouterr().err
    assert any("training file moved" in r.getMessage() for r in caplog.records)
    assert read_train_state(out / "final").step == 4
    assert json.loads((out / "sae_recipe.json").read_text())["data"]["source"] == str(moved)
