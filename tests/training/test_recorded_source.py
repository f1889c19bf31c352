"""Training-side fixes from the issue 25 user audit, training half: a relative local
``data.source`` is recorded absolute with a fingerprint of the file (so an analysis from
another directory cannot measure a different ``stories.jsonl`` and call it the training
data), resume still works from anywhere and for runs recorded before the change, and
``train`` says how it cut the corpus into documents."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest

from bilinear_lens.data.corpus import assign_splits, load_texts
from bilinear_lens.data.fingerprint import fingerprint_file, read_fingerprint
from bilinear_lens.data.synthetic import synthetic_stories
from bilinear_lens.files.names import DATA_FINGERPRINT_FILE, RUN_CONFIG_FILE
from bilinear_lens.training.config import RunConfig, load_run_config
from bilinear_lens.training.loop import train
from bilinear_lens.training.measured_text import WORKING_DIRECTORY_NOTE, MeasuredTextError, measured_text


def _recipe(cache_dir: Path, source: str, **train_overrides) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_mlp": 64, "n_ctx": 16, "seed": 0},
        "data": {"source": source, "vocab_size": 300, "val_fraction": 0.2, "cache_dir": str(cache_dir)},
        "train": {"steps": 2, "batch_size": 4, "lr": 1e-2, "log_every": 0, "eval_every": 0, "device": "cpu",
                  "num_threads": 1, **train_overrides},
    }, where="test recipe")


def _write_jsonl(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in synthetic_stories(120, seed=seed)),
                    encoding="utf-8")
    return path


@pytest.fixture
def audit(tmp_path, monkeypatch):
    """The audit's layout: dirs A and B each hold a *different* stories.jsonl; a run is trained
    from A with ``data.source=stories.jsonl``; the working directory is then B."""
    a, b = tmp_path / "A", tmp_path / "B"
    _write_jsonl(a / "stories.jsonl", seed=1)
    _write_jsonl(b / "stories.jsonl", seed=2)
    monkeypatch.chdir(a)
    result = train(_recipe(tmp_path / "cache", "stories.jsonl"), a / "runs" / "jsonl", progress=False)
    monkeypatch.chdir(b)
    return a, b, result


def _val_documents(corpus: Path) -> list[str]:
    return [t for s, t in assign_splits(load_texts(corpus), 0.2, 0) if s == "val"]


def test_relative_source_is_recorded_absolute_with_its_fingerprint(audit):
    a, _, result = audit
    corpus = (a / "stories.jsonl").resolve()
    expected = fingerprint_file(corpus)
    for directory in (result.out_dir, result.final_checkpoint):
        assert load_run_config(directory / RUN_CONFIG_FILE).data.source == str(corpus)
        assert read_fingerprint(directory / DATA_FINGERPRINT_FILE) == expected


def test_audit_scenario_measures_the_training_file_not_the_one_in_the_working_directory(audit):
    a, b, result = audit
    measured = measured_text(None, str(result.final_checkpoint), n_texts=None)
    assert measured.origin == "training-data" and measured.note is None
    assert measured.texts == _val_documents(a / "stories.jsonl") != _val_documents(b / "stories.jsonl")


def test_audit_scenario_refuses_when_the_file_there_now_differs(audit):
    a, b, result = audit
    corpus = (a / "stories.jsonl").resolve()
    trained = fingerprint_file(corpus)
    shutil.copyfile(b / "stories.jsonl", corpus)  # the file of that name is now another corpus
    now = fingerprint_file(corpus)
    assert now.size != trained.size
    message = (f"the model was trained on {corpus} (sha256 {trained.sha256[:8]}..., {trained.size} bytes); "
               f"the file there now differs ({now.size} bytes): give --text-file")
    with pytest.raises(MeasuredTextError) as err:
        measured_text(None, str(result.final_checkpoint), n_texts=4)
    assert str(err.value) == message


def test_same_size_changed_bytes_are_refused_by_sha256(audit):
    a, _, result = audit
    corpus = (a / "stories.jsonl").resolve()
    trained = fingerprint_file(corpus)
    data = corpus.read_bytes()
    corpus.write_bytes(data.replace(b"Once", b"ONCE", 1))
    now = fingerprint_file(corpus)
    assert now.size == trained.size and now.sha256 != trained.sha256
    with pytest.raises(MeasuredTextError, match=rf"the file there now differs \(sha256 {now.sha256[:8]}\.\.\., "
                                                rf"{now.size} bytes\): give --text-file$"):
        measured_text(None, str(result.final_checkpoint), n_texts=4)


def _make_old_style(run: Path) -> None:
    """What a run recorded before this change holds: a relative data.source, no fingerprint."""
    for directory in [run, *(p.parent for p in run.rglob(RUN_CONFIG_FILE))]:
        config = directory / RUN_CONFIG_FILE
        if config.is_file():
            old = load_run_config(config)
            dataclasses.replace(old, data=dataclasses.replace(old.data, source="stories.jsonl")).save_toml(config)
        (directory / DATA_FINGERPRINT_FILE).unlink(missing_ok=True)


def test_old_style_record_keeps_todays_lookup_and_says_when_it_used_the_working_directory(audit, monkeypatch):
    a, b, result = audit
    _make_old_style(result.out_dir)
    measured = measured_text(None, str(result.final_checkpoint), n_texts=None)  # from B: B's file, flagged
    assert measured.texts == _val_documents(b / "stories.jsonl")
    assert measured.note == (f"{WORKING_DIRECTORY_NOTE} ({(b / 'stories.jsonl').resolve()}); the run records no "
                             "fingerprint of its training file")
    assert measured.describe().endswith(f"[{measured.note}]")
    monkeypatch.chdir(a / "runs")  # the run directory's parent holds it: found there too, no note
    shutil.copyfile(a / "stories.jsonl", a / "runs" / "stories.jsonl")
    measured = measured_text(None, str(result.final_checkpoint), n_texts=None)
    assert measured.note is None and measured.texts == _val_documents(a / "stories.jsonl")


def test_resume_from_another_working_directory(audit, tmp_path):
    a, _, result = audit  # working directory: B, which holds another stories.jsonl
    recipe = load_run_config(result.out_dir / RUN_CONFIG_FILE, ["train.steps=4"])
    resumed = train(recipe, result.out_dir, resume=True, progress=False)
    assert resumed.steps == 4 and resumed.finished
    assert read_fingerprint(resumed.final_checkpoint / DATA_FINGERPRINT_FILE) == fingerprint_file(a / "stories.jsonl")


def test_resume_with_a_relative_source_from_elsewhere_names_both_paths(audit, tmp_path):
    a, b, result = audit
    with pytest.raises(ValueError, match=r"data\.source: '.*/A/stories\.jsonl' \(saved\) != '.*/B/stories\.jsonl' "
                                         r"\(given\)"):
        train(_recipe(tmp_path / "cache", "stories.jsonl", steps=4), result.out_dir, resume=True, progress=False)


def test_resume_of_a_run_recorded_relative_before_the_change(audit, monkeypatch):
    a, _, result = audit
    _make_old_style(result.out_dir)
    monkeypatch.chdir(a)  # where it was trained: its relative record names the same file
    recipe = load_run_config(result.out_dir / RUN_CONFIG_FILE, ["train.steps=4"])
    resumed = train(recipe, result.out_dir, resume=True, progress=False)
    assert resumed.steps == 4
    corpus = str((a / "stories.jsonl").resolve())
    assert load_run_config(result.out_dir / RUN_CONFIG_FILE).data.source == corpus  # recorded absolute from now on
    assert read_fingerprint(result.out_dir / DATA_FINGERPRINT_FILE).path == corpus


def test_resume_on_a_changed_file_is_refused(audit):
    a, b, result = audit
    shutil.copyfile(b / "stories.jsonl", a / "stories.jsonl")
    recipe = load_run_config(result.out_dir / RUN_CONFIG_FILE, ["train.steps=4"])
    with pytest.raises(ValueError, match=r"^cannot resume from .*step_000002: it was trained on .*/A/stories\.jsonl "
                                         r"\(sha256 [0-9a-f]{8}\.\.\., \d+ bytes\); .*/A/stories\.jsonl now differs "
                                         r"\(\d+ bytes\); resume on the file it was trained on, or start a new run$"):
        train(recipe, result.out_dir, resume=True, progress=False)


# --- the documents: status line at train time ----------------------------------------------------


@pytest.mark.parametrize("separator, expected", [
    ("\n\n", "documents: file (auto: no <|endoftext|> lines in stories.txt), 1 document; "
             "val = its last 20% (cut mid-document)"),
    ("\n<|endoftext|>\n", "documents: endoftext (auto: <|endoftext|> lines in stories.txt), 120 documents; "
                          "val = {n_val} whole documents (val_fraction 0.2, seed 0)"),
])
def test_train_logs_how_the_text_was_cut_into_documents(tmp_path, caplog, separator, expected):
    from bilinear_lens.data.corpus import is_val_document

    stories = synthetic_stories(120, seed=3)
    corpus = tmp_path / "stories.txt"
    corpus.write_text(separator.join(stories), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="bilinear_lens.training.loop"):
        train(_recipe(tmp_path / "cache", str(corpus), steps=1), tmp_path / "run", progress=False)
    n_val = sum(is_val_document(s, 0.2, 0) for s in stories)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("documents:")]
    assert lines == [expected.format(n_val=n_val)]
    val_loss = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
    finals = [r.getMessage() for r in caplog.records if "val loss" in r.getMessage()]
    assert [m.split(";")[0] for m in finals] == [f"step 1: val loss {val_loss:.4f}"]  # 4 decimals, not repr


def test_relative_tokenizer_file_is_recorded_absolute_and_the_recipe_reruns_from_elsewhere(audit, tmp_path, monkeypatch):
    a, b, result = audit
    shutil.copyfile(result.final_checkpoint / "tokenizer.json", a / "tok.json")
    monkeypatch.chdir(a)
    recipe = dataclasses.replace(_recipe(tmp_path / "cache", "stories.jsonl"), data=dataclasses.replace(
        _recipe(tmp_path / "cache", "stories.jsonl").data, tokenizer="tok.json"))
    first = train(recipe, a / "runs" / "tok", progress=False)
    recorded = load_run_config(first.out_dir / RUN_CONFIG_FILE)
    assert recorded.data.tokenizer == str((a / "tok.json").resolve())
    monkeypatch.chdir(b)  # no tok.json here: the recorded recipe must still name the file trained with
    again = train(recorded, b / "runs" / "again", progress=False)
    assert (again.final_checkpoint / "tokenizer.json").read_bytes() == (first.final_checkpoint / "tokenizer.json").read_bytes()
