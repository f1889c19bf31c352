"""Bad input never loses saved work, and says what and where in one line.

- Writing a model directory (``save_pretrained``, ``convert --out``) replaces only a previous
  model directory: a regular file, the source itself, a training / SAE run directory, a
  training checkpoint or a directory with anything else in it is refused, byte for byte
  untouched.
- A failed resume leaves the run directory as it was: ``run_config.toml`` describes the
  newest checkpoint (a diverging ``--set train.lr=...`` does not stick), a corrupt
  ``train_state.json`` or ``metrics.jsonl`` is refused naming the file before anything is
  rewritten.
- Recipes refuse non-finite floats; ``--out`` that is a file, a single override string and
  non-UTF-8 corpora get clear errors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest

from bilinear_lens import cli
from bilinear_lens.data.corpus import iter_texts
from bilinear_lens.files.atomic import OverwriteRefusedError, atomic_directory, check_replaceable
from bilinear_lens.models.model import BilinearTransformer, build_model
from bilinear_lens.training.config import (
    SCHEDULES,
    DataConfig,
    RunConfig,
    TrainConfig,
    load_run_config,
)
from bilinear_lens.training.loop import learning_rate, train
from conftest import tiny_config


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself) -> sha256 of its bytes."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(err: str, prefix: str) -> str:
    assert err.startswith(prefix) and err.count("\n") == 1, err
    return err


# --- writing a model directory replaces only a model directory ----------------------------


@pytest.fixture(scope="module")
def model(small_tokenizer) -> BilinearTransformer:
    return build_model(tiny_config(d_vocab=len(small_tokenizer), n_layers=1, seed=1), tokenizer=small_tokenizer)


def fake_run_dir(root: Path, model: BilinearTransformer) -> Path:
    """A training run directory's layout (a checkpoint with train state, log, recipe, lock)."""
    run = root / "run"
    model.save_pretrained(run / "checkpoints" / "step_000005")
    (run / "checkpoints" / "step_000005" / "train_state.json").write_text('{"step": 5}\n')
    (run / "metrics.jsonl").write_text('{"step": 5}\n')
    (run / "run_config.toml").write_text("[train]\nsteps = 5\n")
    (run / ".lock").write_text("123 host 0\n")
    return run


def test_save_pretrained_refuses_a_directory_with_other_files(model, tmp_path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("my notes\n")
    (target / "sub").mkdir()
    before = snapshot(target)
    with pytest.raises(OverwriteRefusedError, match=r"holds files that are not part of a model directory: notes.txt, sub/;"):
        model.save_pretrained(target)
    assert snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left behind


@pytest.mark.parametrize("target", ["run", "run/checkpoints/step_000005"])
def test_save_pretrained_refuses_run_directories_and_training_checkpoints(model, tmp_path, target) -> None:
    run = fake_run_dir(tmp_path, model)
    before = snapshot(run)
    with pytest.raises(OverwriteRefusedError) as err:
        model.save_pretrained(tmp_path / target)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / target} holds files")
    if target == "run":
        assert ".lock, checkpoints/, metrics.jsonl, run_config.toml" in message and "training or SAE run" in message
    else:
        assert "train_state.json" in message
    assert snapshot(run) == before


def test_save_pretrained_refuses_a_regular_file_before_writing(model, tmp_path) -> None:
    target = tmp_path / "model.bin"
    target.write_bytes(b"\x00precious")
    with pytest.raises(OverwriteRefusedError, match=r"model.bin is a file, not a directory"):
        model.save_pretrained(target)
    with pytest.raises(OverwriteRefusedError, match=r"model.bin is a file, not a directory: cannot create .*model.bin/m under it"):
        model.save_pretrained(target / "m")
    assert target.read_bytes() == b"\x00precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


def test_a_previous_model_directory_is_still_replaced(model, tmp_path) -> None:
    """Ours over ours, HF over ours (new files), ours over HF (stale HF files go), and an
    empty directory: all replaced atomically."""
    target = tmp_path / "m"
    target.mkdir()  # empty
    build_model(tiny_config(seed=5)).save_pretrained(target)
    model.save_pretrained(target, format="hf")
    assert (target / "generation_config.json").is_file()
    model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = BilinearTransformer.from_pretrained(target)
    assert all(a.equal(b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_other_directory_kinds_replace_only_their_own_kind(tmp_path) -> None:
    """A directory without model weights (an SAE, an atlas shard) replaces only a directory
    holding nothing but its own files: not a model directory."""
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "cfg.json").write_text("{}")
    with atomic_directory(target) as tmp:  # the same kind: replaced
        (tmp / "cfg.json").write_text('{"v": 2}')
    assert (target / "cfg.json").read_text() == '{"v": 2}'
    (target / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(OverwriteRefusedError, match=r"not part of the directory written \(cfg.json\): model.safetensors"):
        with atomic_directory(target) as tmp:
            (tmp / "cfg.json").write_text("{}")
    assert (target / "model.safetensors").read_bytes() == b"weights"
    check_replaceable(tmp_path / "missing")  # nothing there: fine


def test_convert_refuses_every_target_it_would_destroy(model, tmp_path, capsys) -> None:
    src = model.save_pretrained(tmp_path / "src")
    run = fake_run_dir(tmp_path, model)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me\n")
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("keep me too\n")
    before = {p: snapshot(p) for p in (src, run, notes, a_file)}
    cases = [
        (run, "holds files that are not part of a model directory (--out): .lock, checkpoints/"),
        (run / "checkpoints" / "step_000005", "train_state.json"),
        (notes, "notes.txt"),
        (a_file, "is a file, not a directory"),
        (a_file / "sub", "is a file, not a directory: cannot create"),
        (src, "is the source model directory"),
    ]
    for target, expected in cases:
        assert cli.main(["convert", str(src), "--out", str(target)]) == 2
        err = one_line(capsys.readouterr().err, "bilinear-lens convert: error: ")
        assert str(target) in err and expected in err, err
    assert {p: snapshot(p) for p in before} == before
    # a previous export (HF, then ours over it) and an empty directory are fine
    for fmt in ("hf", "bilinear-lens"):
        assert cli.main(["convert", str(src), "--to", fmt, "--out", str(tmp_path / "export")]) == 0
    (tmp_path / "empty").mkdir()
    assert cli.main(["convert", str(src), "--out", str(tmp_path / "empty")]) == 0
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


# --- training: a failed resume leaves the run directory as it was -------------------------------


def small_recipe(cache_dir: Path, **train) -> RunConfig:
    return RunConfig.from_dict({
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_mlp": 64, "n_ctx": 32, "seed": 0},
        "data": {"source": "synthetic", "vocab_size": 300, "max_docs": 400, "val_fraction": 0.1,
                 "tokenizer_train_docs": 400, "cache_dir": str(cache_dir)},
        "train": {"steps": 6, "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "log_every": 2,
                  "eval_every": 3, "eval_batches": 1, "checkpoint_every": 3, "device": "cpu", "num_threads": 1,
                  **train},
    }, where="safety recipe")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A run stopped at step 3 (checkpoint step_000003, metrics, run_config.toml); tests copy it."""
    root = tmp_path_factory.mktemp("safety_run")
    cfg = small_recipe(root / "cache")
    result = train(cfg, root / "run", progress=False, stop_at=3)
    assert result.steps == 3 and len(result.metrics) >= 2
    return root / "run"


@pytest.fixture
def run(stopped_run, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(stopped_run, tmp_path / "run"))


def resume_cli(run: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(run), "--resume", "--quiet", "--no-progress", *extra]


def test_a_diverging_resume_does_not_rewrite_the_run_config(run, capsys, monkeypatch) -> None:
    """Before: ``--resume --set train.lr=1e6`` diverged, and left run_config.toml with the
    bad lr, so a plain ``--resume`` diverged again."""
    import bilinear_lens.training.loop as loop

    recipe_before = (run / "run_config.toml").read_bytes()
    real_loss = loop.compute_loss

    def nan_loss(model, block, reduction="mean"):
        loss = real_loss(model, block, reduction)
        return loss * float("nan") if model.training else loss

    monkeypatch.setattr(loop, "compute_loss", nan_loss)
    assert cli.main(resume_cli(run, "--set", "train.lr=1e6", "--set", "train.steps=8")) == 1
    err = one_line(capsys.readouterr().err, "bilinear-lens train: error: non-finite training loss")
    assert "step_000003" in err
    assert (run / "run_config.toml").read_bytes() == recipe_before
    monkeypatch.setattr(loop, "compute_loss", real_loss)
    assert cli.main(resume_cli(run)) == 0  # the run's own recipe: lr 1e-2, 6 steps
    saved = load_run_config(run / "final" / "run_config.toml")
    assert saved.train.lr == 1e-2 and saved.train.steps == 6
    assert (run / "run_config.toml").read_bytes() == (run / "final" / "run_config.toml").read_bytes()
    # a successful resume with a new recipe makes it the run's once its checkpoint exists
    assert cli.main(resume_cli(run, "--set", "train.steps=7")) == 0
    assert load_run_config(run / "run_config.toml").train.steps == 7


@pytest.mark.parametrize("warmup", [2, 0])
def test_a_bad_train_state_is_refused_before_anything_is_rewritten(run, capsys, warmup) -> None:
    """Before: ``"step": -7`` emptied metrics.jsonl, then failed with ``step must be >= 0``
    naming no file (with warmup_steps=0: a raw ZeroDivisionError)."""
    if warmup == 0:
        recipe = run / "run_config.toml"
        recipe.write_text(recipe.read_text().replace("warmup_steps = 2", "warmup_steps = 0"))
    state_file = run / "checkpoints" / "step_000003" / "train_state.json"
    original = state_file.read_text()
    for field, value, shown in [("step", -7, "step=-7"), ("step", "3", "step='3'"),
                                ("metrics.tokens", -1, "metrics.tokens=-1"),
                                ("metrics.interval", {"loss_sum": 1.0}, "metrics.interval=")]:
        meta = json.loads(original)
        table, _, key = field.rpartition(".")
        (meta[table] if table else meta)[key] = value
        state_file.write_text(json.dumps(meta))
        before = snapshot(run)
        assert cli.main(resume_cli(run)) == 2
        err = one_line(capsys.readouterr().err, "bilinear-lens train: error: ")
        assert f"training state {state_file}: {shown}" in err, err
        assert snapshot(run) == before
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 2
    state_file.write_text(original)  # fixed: the run resumes
    assert cli.main(resume_cli(run)) == 0


def test_a_non_utf8_metrics_log_is_named_and_kept(run, capsys) -> None:
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes() + b'{"step": 3, "x": "\xff"}\n' + b'{"step": 3}\n')
    before = snapshot(run)
    assert cli.main(resume_cli(run)) == 2
    err = one_line(capsys.readouterr().err, "bilinear-lens train: error: ")
    assert f"{metrics}: line" in err and "not UTF-8" in err
    assert snapshot(run) == before


def test_learning_rate_is_total_over_validated_configs() -> None:
    """Every schedule, warmup (0 included) and length: finite, within [min_lr, lr], no
    ZeroDivisionError; a negative step is a clear ValueError."""
    for schedule in SCHEDULES:
        for warmup in (0, 1, 5):
            for total in (1, 2, 5, 10):
                cfg = TrainConfig(steps=total, lr=1e-2, min_lr=1e-3, warmup_steps=warmup, schedule=schedule)
                for step in range(total + 3):
                    lr = learning_rate(step, cfg, total)
                    ulp = 1e-12 * cfg.lr  # cosine at progress 0 rounds to lr + 1 ulp
                    assert math.isfinite(lr) and 0 < lr <= cfg.lr + ulp, (schedule, warmup, total, step, lr)
                    if step >= warmup:
                        assert lr >= cfg.min_lr - ulp
    with pytest.raises(ValueError, match=r"step must be >= 0, got -7"):
        learning_rate(-7, TrainConfig(warmup_steps=0), 10)


# --- recipes, run directories, overrides, corpora ------------------------------------------------


FLOAT_FIELDS = [("train", f.name) for f in dataclasses.fields(TrainConfig) if f.type in ("float", float)] + \
               [("data", f.name) for f in dataclasses.fields(DataConfig) if f.type in ("float", float)]


def test_the_float_fields_are_the_expected_ones() -> None:
    assert {name for _, name in FLOAT_FIELDS} >= {"lr", "min_lr", "epochs", "eps", "beta1", "beta2", "weight_decay",
                                                  "grad_clip", "max_abs_weight", "val_fraction"}


@pytest.mark.parametrize("section,key", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_refused_naming_key_section_and_file(tmp_path, section, key, value) -> None:
    path = tmp_path / "recipe.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n")
    cls = "TrainConfig" if section == "train" else "DataConfig"
    for overrides in ([], [f"{section}.{key}={value}"]):
        source = path if not overrides else None
        with pytest.raises(ValueError) as err:
            load_run_config(source, overrides)
        message = str(err.value)
        assert f"{cls}.{key}={value} is invalid: must be a finite number" in message
        assert (str(path) in message) if source else (f"overrides ['{section}.{key}={value}']" in message)


def test_lr_inf_is_refused_by_the_cli_before_any_step(tmp_path, capsys) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nsteps = 3\n")
    rc = cli.main(["train", "--config", str(recipe), "--set", "train.lr=inf", "--out", str(tmp_path / "run")])
    err = one_line(capsys.readouterr().err, "bilinear-lens train: error: ")
    assert rc == 2 and "TrainConfig.lr=inf is invalid: must be a finite number" in err and str(recipe) in err
    assert not (tmp_path / "run").exists()


def test_a_run_directory_that_is_a_file_is_named(tmp_path, capsys) -> None:
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("keep\n")
    with pytest.raises(FileExistsError, match=r"^run directory .*a_file.txt \(--out\) is a file, not a directory"):
        train(small_recipe(tmp_path / "cache"), a_file, progress=False)
    with pytest.raises(FileExistsError, match=r"a_file.txt/run \(--out\) lies under .*a_file.txt, which is a file"):
        train(small_recipe(tmp_path / "cache"), a_file / "run", progress=False)
    assert cli.main(["sae", "train", "--checkpoint", str(tmp_path / "m"), "--out", str(a_file), "--no-progress"]) == 2
    err = one_line(capsys.readouterr().err, "bilinear-lens sae: error: ")
    assert f"run directory {a_file} (--out) is a file, not a directory" in err and "Errno" not in err
    assert a_file.read_text() == "keep\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file.txt"]


def test_overrides_as_a_single_string(tmp_path) -> None:
    assert load_run_config(None, "train.steps=3").train.steps == 3
    assert load_run_config(None, ("train.steps=4",)).train.steps == 4
    for bad in (3, [3], {"train.steps": 3}):
        with pytest.raises(TypeError, match=r"overrides must be a list of strings"):
            load_run_config(None, bad)


def test_a_non_utf8_corpus_names_the_file_and_field(tmp_path) -> None:
    for name, content in (("c.txt", b"fine\n\nab\xffcd\n"), ("c.jsonl", b'{"text": "ab\xffcd"}\n')):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ValueError, match=rf"^corpus file {path} \(data.source\) is not UTF-8 text"):
            list(iter_texts(path))
    cfg = small_recipe(tmp_path / "cache")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=str(tmp_path / "c.txt")))
    with pytest.raises(ValueError, match=rf"corpus file {tmp_path / 'c.txt'} \(data.source\) is not UTF-8"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
