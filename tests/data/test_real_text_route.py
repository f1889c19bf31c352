"""The documented route to real text (training/README.md, "Real text"): a local file by
relative or absolute path, JSONL and parquet with one story per row, the shipped sample,
and the real-data recipe's missing corpus naming the override."""

import json
from pathlib import Path

import pytest

from bilinear_lens.cli import main as cli_main
from bilinear_lens.data.corpus import load_texts, text_file_rule

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "training" / "sample_stories.txt"


def test_shipped_sample_is_marked_stories():
    stories = load_texts(SAMPLE)
    assert text_file_rule(SAMPLE) == "endoftext" and len(stories) == 300
    assert all(story.startswith("Once upon a time") for story in stories)


def test_relative_absolute_jsonl_and_parquet_read_the_same_stories(tmp_path, monkeypatch):
    stories = load_texts(SAMPLE)[:20]
    (tmp_path / "s.txt").write_text("\n<|endoftext|>\n".join(stories), encoding="utf-8")
    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in stories), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"story": stories}), tmp_path / "s.parquet")
    monkeypatch.chdir(tmp_path)
    assert load_texts("s.txt") == stories == load_texts(tmp_path / "s.txt")
    assert load_texts("s.jsonl") == stories
    assert load_texts("s.parquet", text_column="story") == stories


def test_real_data_recipe_without_its_corpus_names_the_override(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ../shared beside this directory
    rc = cli_main(["train", "--config", str(ROOT / "training/configs/tinystories-1l-cpu.toml"),
                   "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "corpus file not found:" in err and "validation_sample.txt (data.source)" in err
    assert "--set data.source=path/to/stories.txt" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
