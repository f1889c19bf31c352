"""Training image classifiers with the shared Trainer: exact resume, metrics with held-out
accuracy, input noise as a pure function of the step, recipes and their errors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bilinear_lens.models.image_classifier import load_image_classifier
from bilinear_lens.training.image_train import (
    RECIPE_FILE,
    ImageTraining,
    load_image_recipe,
    main,
    train_image_classifier,
)
from bilinear_lens.training.metrics import read_metrics
from images_fixtures import digits

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
TIMING = ("elapsed_s", "tokens_per_s")  # wall-clock fields, the only ones that may differ between runs
SMALL = ["model.d_mlp=16", "train.steps=24", "train.batch_size=64", "train.eval_every=8", "train.log_every=4",
         "train.checkpoint_every=8", "data.input_noise=0.3"]


def strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_stop_and_resume_equals_training_straight_bitwise(tmp_path):
    recipe = load_image_recipe(None, SMALL)
    straight = train_image_classifier(recipe, tmp_path / "a", progress=False, data=digits())
    part = train_image_classifier(recipe, tmp_path / "b", progress=False, data=digits(), stop_at=11)
    assert not part.finished and part.steps == 11
    resumed = train_image_classifier(recipe, tmp_path / "b", resume=True, progress=False, data=digits())
    assert resumed.steps == straight.steps == 24
    a, b = load_image_classifier(tmp_path / "a"), load_image_classifier(tmp_path / "b")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert strip(read_metrics(tmp_path / "a" / "metrics.jsonl")) == strip(read_metrics(tmp_path / "b" / "metrics.jsonl"))
    evals = [r for r in straight.metrics if r.get("val_accuracy") is not None]
    assert [r["step"] for r in evals] == [0, 8, 16, 24]
    assert straight.val_accuracy == evals[-1]["val_accuracy"] > evals[0]["val_accuracy"]
    saved = json.loads((tmp_path / "a" / RECIPE_FILE).read_text())
    assert saved["data"]["input_noise"] == 0.3 and saved["train"]["steps"] == 24


def test_resuming_a_finished_run_writes_nothing_and_changed_data_is_refused(tmp_path):
    recipe = load_image_recipe(None, SMALL)
    train_image_classifier(recipe, tmp_path / "r", progress=False, data=digits())
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file()}
    again = train_image_classifier(recipe, tmp_path / "r", resume=True, progress=False, data=digits())
    assert again.already_finished
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*") if p.is_file()}
    changed = load_image_recipe(None, SMALL[:-1] + ["data.input_noise=0.1", "train.steps=30"])
    with pytest.raises(ValueError, match=r"differs from the run's .* in data.input_noise: saved 0.3, given 0.1; "
                                         r"on resume only \[train\] values may change"):
        train_image_classifier(changed, tmp_path / "r", resume=True, progress=False, data=digits())
    with pytest.raises(FileExistsError, match="already holds an image-classifier run"):
        train_image_classifier(recipe, tmp_path / "r", progress=False, data=digits())


def test_batches_are_a_pure_function_of_the_step_with_noise():
    clean = ImageTraining(*_task_args(["data.input_noise=0.0"]))
    noisy = ImageTraining(*_task_args(["data.input_noise=0.5"]))
    b1, b2 = noisy.batch(7), ImageTraining(*_task_args(["data.input_noise=0.5"])).batch(7)
    assert torch.equal(b1, b2)  # a fresh task gives the same batch: exact resume
    c = clean.batch(7)
    assert torch.equal(b1[:, -1], c[:, -1])  # same images and labels, noise only on the pixels
    noise = b1[:, :-1] - c[:, :-1]
    assert abs(float(noise.std()) - 0.5) < 0.02  # 128 x 64 draws: std error ~0.004
    assert not torch.equal(noisy.batch(8)[:, :-1] - clean.batch(8)[:, :-1], noise)
    # one epoch visits every training image once
    seen = torch.cat([_indices(clean, s) for s in range(clean.batches_per_epoch)])
    assert len(set(seen.tolist())) == len(seen)


def _task_args(overrides):
    from bilinear_lens.models.image_classifier import ImageClassifier

    recipe = load_image_recipe(None, overrides)
    return ImageClassifier(recipe.model), digits(), recipe, torch.device("cpu")


def _indices(task, step):
    epoch, i = divmod(step, task.batches_per_epoch)
    bs = task.recipe.train.batch_size
    return task._permutation(epoch)[i * bs:(i + 1) * bs]


@pytest.mark.parametrize("override,message", [
    ("data.input_noise=-1", "ImageDataSpec.input_noise=-1 is invalid: must be a finite number >= 0"),
    ("data.dataset='cifar'", "ImageDataSpec.dataset='cifar' is invalid: allowed values are ['digits', 'fashion_mnist', 'mnist']"),
    ("model.mlp_kind='tanh'", "ImageClassifierConfig.mlp_kind='tanh' is invalid"),
])
def test_bad_recipe_values_name_the_field(override, message):
    with pytest.raises(ValueError) as err:
        load_image_recipe(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_keys_and_a_model_that_does_not_fit_the_data(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[data]\nnoise = 0.1\n")
    with pytest.raises(ValueError, match=r"unsupported key\(s\) \['noise'\] in section \[data\] of .*r.toml"):
        load_image_recipe(path)
    recipe = load_image_recipe(None, ["model.image_shape=[28, 28]"])
    with pytest.raises(ValueError, match=r"model.image_shape=\(28, 28\) in <defaults> .* does not fit dataset 'digits', "
                                         r"whose image_shape is \(8, 8\)"):
        train_image_classifier(recipe, tmp_path / "o", progress=False, data=digits())
    assert not (tmp_path / "o").exists()


def test_shipped_recipes_load_and_compare_at_matched_parameters():
    bil, relu = load_image_recipe(CONFIGS / "digits-bilinear.toml"), load_image_recipe(CONFIGS / "digits-relu.toml")
    assert (bil.model.mlp_kind, relu.model.mlp_kind) == ("bilinear", "relu")
    assert 3 * 64 * bil.model.d_mlp == 2 * 64 * relu.model.d_mlp  # gated: 3 matrices, plain: 2
    assert load_image_recipe(CONFIGS / "digits-bilinear-noise.toml").data.input_noise > 0
    overfit = load_image_recipe(CONFIGS / "digits-overfit.toml")
    assert overfit.data.max_train == 100 and overfit.train.weight_decay == 0


def test_cli_trains_and_reports_errors_in_one_line(tmp_path, capsys):
    code = main(["--out", str(tmp_path / "cli"), "--no-progress", *[a for o in SMALL[:2] + ["train.steps=4",
                 "train.eval_every=4"] for a in ("--set", o)]])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("step 4: val_accuracy 0.") and (tmp_path / "cli" / "final").is_dir()
    assert main(["--out", str(tmp_path / "bad"), "--set", "data.dataset=cifar"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: <defaults> with overrides") and "ImageDataSpec.dataset='cifar'" in err
    assert "\n" not in err


@pytest.mark.slow
def test_analysis_script_trains_the_recipes_and_writes_its_table(tmp_path):
    # ~45 s on one thread: the five shipped digits recipes, then every reading
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # analysis/ lives at the repo root
    from analysis import images

    results = images.analyse(tmp_path / "runs", tmp_path / "out")
    assert set(results["accuracy"]) == set(images.RUNS)
    for name in images.BILINEAR:  # all eigenvectors per class: the model itself
        assert results["low_rank"][name][64] == results["accuracy"][name]
    assert results["accuracy"]["digits-bilinear"] > 0.95
    assert results["train_accuracy"]["digits-overfit"] > results["accuracy"]["digits-overfit"]
    assert len({results["params"][n] for n in ("digits-bilinear", "digits-relu", "digits-swiglu")}) == 1
    table = (tmp_path / "out" / "images.md").read_text()
    assert "| digits-relu | 12928 |" in table
    assert all((tmp_path / "out" / f"eigenvectors_{n}.png").is_file() for n in images.BILINEAR)
