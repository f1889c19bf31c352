import json

import pytest

from bilinear_lens.models.config import ModelConfig


@pytest.mark.parametrize(
    "changes, field, allowed",
    [
        ({"d_mlp": 0}, "d_mlp", "positive integer"),
        ({"d_model": -4}, "d_model", "positive integer"),
        ({"mlp_kind": "tanh"}, "mlp_kind", "bilinear"),
        ({"d_model": 30, "n_heads": 4}, "d_model", "divisible by n_heads=4"),
        ({"normalization_type": "batchnorm"}, "normalization_type", "RMSPre"),
        ({"positional_embedding_type": "alibi"}, "positional_embedding_type", "rotary"),
        ({"dtype": "int8"}, "dtype", "float32"),
        ({"eps": 0.0}, "eps", "positive number"),
        ({"mlp_bias": "yes"}, "mlp_bias", "true or false"),
        ({"n_layers": 2.5}, "n_layers", "positive integer"),
    ],
)
def test_bad_values_name_field_and_allowed_values(changes, field, allowed):
    with pytest.raises(ValueError) as err:
        ModelConfig(**changes)
    message = str(err.value)
    assert f"ModelConfig.{field}=" in message
    assert allowed in message


def test_defaults_and_derived_fields():
    cfg = ModelConfig(d_model=64, n_heads=8)
    assert cfg.d_mlp == 256 and cfg.d_head == 8
    assert cfg.gated and not cfg.attn_only
    assert ModelConfig(mlp_kind="none").attn_only


def test_dict_json_toml_round_trip(tmp_path):
    cfg = ModelConfig(d_model=48, n_heads=6, mlp_kind="relu", n_layers=3)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save_json(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    (tmp_path / "c.toml").write_text('[model]\nd_model = 48\nn_heads = 6\nmlp_kind = "relu"\nn_layers = 3\n')
    assert ModelConfig.load(tmp_path / "c.toml") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["mlp_kind"] == "relu"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['d_modle'\] in model config"):
        ModelConfig.from_dict({"d_modle": 64})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse model config"):
        ModelConfig.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ModelConfig.load(tmp_path / "missing.json")


def test_matched_params_keeps_mlp_size():
    cfg = ModelConfig(d_model=64, d_mlp=128, mlp_kind="bilinear")
    relu = cfg.with_matched_params("relu")
    assert relu.d_mlp == 192
    assert relu.mlp_params_per_layer() == cfg.mlp_params_per_layer()
    assert relu.with_matched_params("swiglu").d_mlp == 128


def test_no_norm_is_expressible_in_toml(tmp_path):
    """TOML has no null: recipes say normalization_type = "none"; it round-trips as None."""
    from bilinear_lens.training.config import load_run_config

    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\nd_vocab = 97\nnormalization_type = "none"\n')
    cfg = load_run_config(recipe)
    assert cfg.model.normalization_type is None
    again = tmp_path / "again.toml"
    cfg.save_toml(again)
    assert load_run_config(again).model.normalization_type is None
    assert ModelConfig(normalization_type="none") == ModelConfig(normalization_type=None)
    with pytest.raises(ValueError, match=r"normalization_type='RMSNorm' is invalid: allowed values are \['RMS', 'RMSPre', 'LN', 'LNPre'\] or 'none'"):
        ModelConfig(normalization_type="RMSNorm")
