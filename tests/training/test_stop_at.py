"""``stop_at`` is checked the same way by all three trainers (``training.run_dir.check_stop_at``),
before any run directory is made: a bad value leaves nothing on disk."""

from __future__ import annotations

import pytest

from bilinear_lens.sae.train import train_sae
from bilinear_lens.training.image_train import load_image_recipe, train_image_classifier
from bilinear_lens.training.loop import train
from bilinear_lens.training.run_dir import check_stop_at
from conftest import run_config
from fixtures.sae_recipe import recipe as sae_recipe


@pytest.mark.parametrize("value", [0, -1])
def test_check_stop_at_names_the_value(value):
    with pytest.raises(ValueError, match=rf"^stop_at must be >= 1, got {value}$"):
        check_stop_at(value)


@pytest.mark.parametrize("value", [None, 1, 10**9])
def test_check_stop_at_passes_none_and_positive(value):
    assert check_stop_at(value) is None


def _trainers(tmp_path, cache_dir, saved_checkpoint):
    return {
        "train": lambda out, stop: train(run_config(cache_dir), out, progress=False, stop_at=stop),
        "train_sae": lambda out, stop: train_sae(saved_checkpoint(), out, sae_recipe(tmp_path), progress=False,
                                                 stop_at=stop),
        "train_image_classifier": lambda out, stop: train_image_classifier(
            load_image_recipe(None, ["model.d_mlp=16"]), out, progress=False, stop_at=stop),
    }


@pytest.mark.parametrize("trainer", ["train", "train_sae", "train_image_classifier"])
def test_every_trainer_refuses_stop_at_zero_before_making_its_run_directory(
        trainer, tmp_path, cache_dir, saved_checkpoint):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"^stop_at must be >= 1, got 0$"):
        _trainers(tmp_path, cache_dir, saved_checkpoint)[trainer](out, 0)
    assert not out.exists()
