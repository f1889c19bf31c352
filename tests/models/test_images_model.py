"""The image classifier: config validation, the forward pass against its formula, and
atomic safetensors + JSON checkpoints that round-trip exactly."""

from __future__ import annotations

import json

import pytest
import torch

from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.models.image_classifier import (
    ImageClassifier,
    ImageClassifierConfig,
    load_image_classifier,
    save_image_classifier,
)
from bilinear_lens.models.mlp import BilinearMLP
from bilinear_lens.weights.tensor import bilinear_output


def tiny(**overrides) -> ImageClassifierConfig:
    base = dict(image_shape=(4, 5), n_classes=3, d_embed=6, d_mlp=7, seed=1)
    base.update(overrides)
    return ImageClassifierConfig(**base)


@pytest.mark.parametrize("field,value,message", [
    ("image_shape", (4,), "ImageClassifierConfig.image_shape=(4,) is invalid: must be two positive integers [height, width]"),
    ("n_classes", 1, "ImageClassifierConfig.n_classes=1 is invalid: must be at least 2"),
    ("d_embed", -1, "ImageClassifierConfig.d_embed=-1 is invalid: must be a non-negative integer (0: no embedding)"),
    ("n_layers", 3, "ImageClassifierConfig.n_layers=3 is invalid: must be an integer in [1, 2]"),
    ("mlp_kind", "tanh", "ImageClassifierConfig.mlp_kind='tanh' is invalid: allowed values are "
                         "['bilinear', 'gelu', 'linear', 'relu', 'swiglu']"),
    ("residual", 1, "ImageClassifierConfig.residual=1 is invalid: must be true or false"),
    ("init_range", float("nan"), "ImageClassifierConfig.init_range=nan is invalid: must be a finite number >= 0"),
])
def test_bad_config_values_are_refused_naming_field_and_value(field, value, message):
    with pytest.raises(ValueError) as err:
        tiny(**{field: value})
    assert str(err.value) == message


def test_unknown_config_key_is_refused():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['d_model'\] in here; allowed keys"):
        ImageClassifierConfig.from_dict({"d_model": 3}, where="here")


@pytest.mark.parametrize("residual", [False, True])
def test_forward_is_the_documented_formula(residual):
    cfg = tiny(residual=residual, n_layers=2, bias=True)
    model = ImageClassifier(cfg).double()
    x = torch.rand(5, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = x @ model.embed.weight.T
    for mlp in model.mlps:
        out = bilinear_output(mlp, h)  # the bilinear tensor's formula, biases included
        h = h + out if residual else out
    torch.testing.assert_close(model(x), h @ model.unembed.weight.T, rtol=1e-12, atol=1e-12)


def test_no_embedding_reads_pixels_and_images_may_be_2d():
    model = ImageClassifier(tiny(d_embed=0))
    assert model.cfg.d_model == 20 and model.embed is None
    assert torch.equal(model.W_E, torch.eye(20))
    x = torch.rand(3, 4, 5)
    assert torch.equal(model(x), model(x.reshape(3, 20)))
    assert isinstance(model.mlps[0], BilinearMLP)


def test_wrong_image_size_is_one_line_error():
    model = ImageClassifier(tiny())
    with pytest.raises(ValueError) as err:
        model(torch.rand(2, 21))
    assert str(err.value) == "x has shape (2, 21): this model reads [batch, 20] or [batch, 4, 5] images (image_shape=[4, 5])"


def test_init_depends_on_the_seed_only():
    a, b = ImageClassifier(tiny()), ImageClassifier(tiny())
    torch.manual_seed(123)
    c = ImageClassifier(tiny())
    assert all(torch.equal(p, q) and torch.equal(p, r) for p, q, r in zip(a.state_dict().values(), b.state_dict().values(),
                                                                           c.state_dict().values()))
    assert not torch.equal(ImageClassifier(tiny(seed=2)).unembed.weight, a.unembed.weight)


@pytest.mark.parametrize("kind", ["bilinear", "relu", "swiglu"])
def test_save_load_round_trip_is_exact(tmp_path, kind):
    model = ImageClassifier(tiny(mlp_kind=kind, init_range=0.3))
    path = save_image_classifier(model, tmp_path / "clf")
    loaded = load_image_classifier(path)
    assert loaded.cfg == model.cfg
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert json.loads((path / "config.json").read_text())["format"] == "bilinear-lens-image-classifier"


def test_load_refuses_edited_config_and_language_model_dirs(tmp_path):
    path = save_image_classifier(ImageClassifier(tiny()), tmp_path / "clf")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "d_mlp": 8}))
    with pytest.raises(CheckpointError, match="the config differs from the one the weights were saved with"):
        load_image_classifier(path)
    (path / "config.json").write_text(json.dumps({**cfg, "format": "bilinear-lens"}))
    with pytest.raises(CheckpointError, match="is not an image classifier config"):
        load_image_classifier(path)


def test_save_refuses_to_replace_a_foreign_directory(tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="keep.txt"):
        save_image_classifier(ImageClassifier(tiny()), target)
    assert (target / "keep.txt").read_text() == "mine"
