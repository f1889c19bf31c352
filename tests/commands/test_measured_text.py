"""Analyses measure on the model's own data by default and say which text they measured
(issue 25 item 2): before, ablate/report used the synthetic stories whatever the model was
trained on, and polytope labelled real text with synthetic word classes."""

import dataclasses
import json

import pytest

from bilinear_lens.commands import ablate as ablate_cmd
from bilinear_lens.commands.common import UsageError
from bilinear_lens.commands.measured_text import measured_text, recorded_data
from bilinear_lens.commands.polytope import resolve_label_kind
from bilinear_lens.data.corpus import assign_splits, is_val_document, load_texts
from bilinear_lens.data.synthetic import synthetic_stories
from bilinear_lens.models.model import build_model
from bilinear_lens.training.config import DataConfig, RunConfig

from conftest import tiny_config

STORIES = [f"Once upon a time, a cat named Tom{i} was happy.\n\nThe end." for i in range(60)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, small_tokenizer):
    """A model saved twice: with a training record of a local corpus, and with none."""
    root = tmp_path_factory.mktemp("measured")
    corpus = root / "stories.txt"
    corpus.write_text("\n<|endoftext|>\n".join(STORIES), encoding="utf-8")
    tok = small_tokenizer
    model = build_model(tiny_config(d_vocab=len(tok), n_ctx=32), tokenizer=tok)
    model.save_pretrained(root / "local")
    model.save_pretrained(root / "bare")
    record = RunConfig(model=model.cfg, data=DataConfig(source=str(corpus), val_fraction=0.25, seed=3))
    record.save_toml(root / "local" / "run_config.toml")
    synthetic = RunConfig(model=model.cfg, data=DataConfig(source="synthetic", val_fraction=0.1, seed=5))
    model.save_pretrained(root / "synthetic")
    synthetic.save_toml(root / "synthetic" / "run_config.toml")
    return root


def test_default_is_the_recorded_corpus_validation_documents(checkpoints):
    measured = measured_text(None, str(checkpoints / "local"), n_texts=None)
    assert (measured.origin, measured.split, measured.documents) == ("training-data", "val", "endoftext")
    expected = [t for s, t in assign_splits(load_texts(checkpoints / "stories.txt"), 0.25, 3) if s == "val"]
    assert measured.texts == expected and 0 < len(expected) < len(STORIES)
    assert "the model's training data (val split of" in measured.describe()


def test_synthetic_record_gives_its_validation_stories(checkpoints):
    measured = measured_text(None, str(checkpoints / "synthetic"), n_texts=7)
    texts = list(measured.texts)  # generated lazily: --n-texts may be huge
    assert measured.origin == "synthetic" and measured.split == "val" and len(texts) == 7
    assert all(is_val_document(t, 0.1, 5) for t in texts)


def test_no_record_falls_back_to_synthetic_and_says_so(checkpoints):
    measured = measured_text(None, str(checkpoints / "bare"), n_texts=4, seed=2)
    assert list(measured.texts) == synthetic_stories(4, seed=2) and measured.origin == "synthetic"
    assert "records no training data" in measured.note and "--text-file" in measured.note


def test_text_file_wins_and_is_named(checkpoints, tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("One story.\n<|endoftext|>\nTwo story.\n", encoding="utf-8")
    measured = measured_text(str(path), str(checkpoints / "local"), n_texts=1)
    assert measured.texts == ["One story."] and measured.documents_in_source == 2
    assert measured.describe().startswith(f"--text-file {path}, documents: endoftext, 1 document")


def test_unreadable_recorded_corpus_names_source_and_flag(checkpoints, tmp_path):
    moved = tmp_path / "moved"
    build_model(tiny_config()).save_pretrained(moved)
    data = dataclasses.replace(recorded_data(str(checkpoints / "local")), source="gone/stories.txt")
    RunConfig(model=tiny_config(), data=data).save_toml(moved / "run_config.toml")
    with pytest.raises(UsageError, match=r"trained on gone/stories\.txt \(data\.source in its run_config\.toml\), "
                       r"which is not found from here; give the text to measure with --text-file"):
        measured_text(None, str(moved), n_texts=3)


def test_ablate_reports_what_it_measured(checkpoints, capsys):
    argv = ["--checkpoint", str(checkpoints / "local"), "--n-texts", "3", "--seq-len", "16", "--top", "2"]
    assert ablate_cmd.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["text"]["origin"] == "training-data" and report["text"]["split"] == "val"
    assert report["measured_on"].startswith("the model's training data (val split of")
    assert ablate_cmd.main(argv) == 0
    assert "measured on the model's training data (val split of" in capsys.readouterr().out
    assert ablate_cmd.main(["--checkpoint", str(checkpoints / "bare"), "--n-texts", "2", "--seq-len", "16",
                            "--json"]) == 0
    assert "records no training data" in json.loads(capsys.readouterr().out)["measured_on"]


def test_polytope_labels_follow_the_training_data(checkpoints):
    assert resolve_label_kind("auto", str(checkpoints / "local")) == "token"
    assert resolve_label_kind("auto", str(checkpoints / "synthetic")) == "word-class"
    assert resolve_label_kind("auto", str(checkpoints / "bare")) == "word-class"
    assert resolve_label_kind("none", str(checkpoints / "local")) == "none"


@pytest.mark.parametrize("command", ["ablate", "report", "polytope"])
def test_documents_without_text_file_is_refused_not_ignored(checkpoints, capsys, tmp_path, command):
    from bilinear_lens.commands import polytope as polytope_cmd
    from bilinear_lens.commands import report as report_cmd

    main = {"ablate": ablate_cmd.main, "report": report_cmd.main, "polytope": polytope_cmd.main}[command]
    extra = ["--out", str(tmp_path / "r.html")] if command == "report" else []
    assert main(["--checkpoint", str(checkpoints / "local"), "--documents", "paragraph", "--quiet", *extra]) == 2
    assert capsys.readouterr().err == (
        f"bilinear-lens {command}: error: --documents paragraph applies to --text-file only; without it the model's own "
        "training data is split as its run recorded (data.documents); give --text-file too\n")
    assert not (tmp_path / "r.html").exists()


def test_polytope_names_the_text_its_rule_and_document_count(checkpoints, capsys):
    from bilinear_lens.commands import polytope as polytope_cmd

    corpus = checkpoints / "stories.txt"
    argv = ["--checkpoint", str(checkpoints / "local"), "--text-file", str(corpus), "--max-tokens", "100", "--quiet"]
    assert polytope_cmd.main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    trained = sum(not is_val_document(t, 0.25, 3) for t in STORIES)
    assert first == (f"measured on --text-file {corpus}, documents: endoftext (--documents auto), "
                     f"{len(STORIES)} documents [--text-file is the model's training file ({corpus}): {trained} of "
                     f"the {len(STORIES)} documents taken were in its training split; leave out --text-file to measure "
                     "its val split only]; labels: token")
    assert polytope_cmd.main([*argv, "--documents", "file", "--json"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    assert text == {"origin": "text-file", "source": str(corpus), "documents": "file", "rule": "file",
                    "documents_in_file": 1, "labels": "token",
                    "note": f"--text-file is the model's training file ({corpus}): the text measured includes text it "
                            "was trained on; leave out --text-file to measure its val split only"}


def test_polytope_without_text_file_measures_the_models_val_documents(checkpoints, capsys):
    """What ablate and report measure: the recorded corpus' val split, named on the first line;
    the counted tokens are those of packing exactly those documents."""
    from bilinear_lens.commands import polytope as polytope_cmd
    from bilinear_lens.data.packing import pack_documents
    from bilinear_lens.commands.common import load_model_with_tokenizer

    val = [t for s, t in assign_splits(load_texts(checkpoints / "stories.txt"), 0.25, 3) if s == "val"]
    argv = ["--checkpoint", str(checkpoints / "local"), "--max-tokens", "100000", "--quiet"]
    assert polytope_cmd.main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"measured on the model's training data (val split of {checkpoints / 'stories.txt'}), documents: "
                     f"endoftext, {len(val)} documents; labels: token")
    assert polytope_cmd.main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["text"]["origin"], result["text"]["split"], result["text"]["n_documents"]) == ("training-data", "val", len(val))
    model = load_model_with_tokenizer(str(checkpoints / "local"), "polytope")
    packed = pack_documents(model.tokenizer, val, model.cfg.n_ctx, 100000, 8)
    counted = packed.mask & (packed.rows != model.tokenizer.bos_token_id)
    assert result["tokens_read"] == packed.counts["tokens_read"] and result["tokens"] == int(counted.sum())


def test_polytope_with_no_record_says_it_measured_synthetic_stories(checkpoints, capsys):
    from bilinear_lens.commands import polytope as polytope_cmd

    assert polytope_cmd.main(["--checkpoint", str(checkpoints / "bare"), "--max-tokens", "300", "--quiet"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("measured on the built-in synthetic stories") and "records no training data" in first


def test_text_file_that_is_the_training_file_says_how_much_was_trained_on(checkpoints, tmp_path, capsys):
    """Issue 25 audit: a --text-file equal to the training corpus silently mixed training
    documents into the measurement. Now the result says so and how many, and names the fix."""
    corpus = checkpoints / "stories.txt"
    measured = measured_text(str(corpus), str(checkpoints / "local"), n_texts=20)
    trained = sum(not is_val_document(t, 0.25, 3) for t in STORIES[:20])
    assert 0 < trained < 20  # both splits present: the count is a real count
    assert measured.note == (f"--text-file is the model's training file ({corpus}): {trained} of the 20 documents "
                             "taken were in its training split; leave out --text-file to measure its val split only")
    other = tmp_path / "other.txt"
    other.write_text("\n<|endoftext|>\n".join(STORIES[:20]), encoding="utf-8")  # other bytes: not the file
    assert measured_text(str(other), str(checkpoints / "local"), n_texts=20).note is None
    assert measured_text(str(corpus), str(checkpoints / "bare"), n_texts=20).note is None  # no record
    argv = ["--checkpoint", str(checkpoints / "local"), "--text-file", str(corpus), "--n-texts", "20",
            "--seq-len", "16", "--top", "2", "--quiet"]
    assert ablate_cmd.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["text"]["note"] == measured.note and report["measured_on"].endswith(f"[{measured.note}]")


def test_a_copy_of_the_training_file_is_recognised_by_its_fingerprint(tmp_path, monkeypatch):
    from bilinear_lens.training.loop import train

    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n<|endoftext|>\n".join(STORIES), encoding="utf-8")
    recipe = RunConfig.from_dict({
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_mlp": 64, "n_ctx": 16, "seed": 0},
        "data": {"source": str(corpus), "vocab_size": 300, "val_fraction": 0.25, "seed": 3,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"steps": 1, "batch_size": 4, "log_every": 0, "eval_every": 0, "device": "cpu", "num_threads": 1},
    }, where="test recipe")
    final = train(recipe, tmp_path / "run", progress=False).final_checkpoint
    copy = tmp_path / "copy.txt"
    copy.write_bytes(corpus.read_bytes())
    note = measured_text(str(copy), str(final), n_texts=None).note
    trained = sum(not is_val_document(t, 0.25, 3) for t in STORIES)
    assert note is not None and f"{trained} of the {len(STORIES)} documents taken were in its training split" in note
