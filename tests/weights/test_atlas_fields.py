"""Atlas errors name build_atlas's parameter and value and carry the field
(bilinear_lens.field_errors); the eigen command prints its flag for that field."""

from __future__ import annotations

import pytest
import torch

from bilinear_lens import cli
from bilinear_lens.field_errors import FieldError, message_for
from bilinear_lens.models.model import build_model
from bilinear_lens.weights.atlas import build_atlas
from bilinear_lens.weights.atlas_store import AtlasError
from bilinear_lens.weights.tensor import BilinearWeights
from conftest import tiny_config

FLAGS = {"k": "--top", "shard_size": "--shard-size", "resume": "--resume", "out": "--out", "layers": "--layer"}


def weights() -> BilinearWeights:
    """W [d 24, d_mlp 40] twice and W_out [d_mlp 40, d 24] (the layout BilinearWeights takes)."""
    g = torch.Generator().manual_seed(0)
    return BilinearWeights(*(torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((24, 40), (24, 40), (40, 24))))


def directions(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kwargs, field, library, cli_text", [
    ({"k": 25}, "k", "k must be in [1, 24] (d_model), got 25", "k (--top) must be in [1, 24] (d_model), got 25"),
    ({"k": 2, "shard_size": 0}, "shard_size", "shard_size must be >= 1, got 0", "shard_size (--shard-size) must be >= 1, got 0"),
    ({"k": 2, "device": "tpu"}, "device", "device 'tpu' is not one of auto, cpu, cuda, cuda:N",
     "device (--device) 'tpu' is not one of auto, cpu, cuda, cuda:N"),
])
def test_bad_values_name_the_parameter_and_carry_the_field(tmp_path, kwargs, field, library, cli_text):
    with pytest.raises(FieldError) as caught:
        build_atlas({0: weights()}, directions(), tmp_path / "a", progress=False, **kwargs)
    err = caught.value
    assert isinstance(err, ValueError) and err.field == field and err.fields == (field,)
    assert str(err) == library and message_for(err, {**FLAGS, "device": "--device"}) == cli_text


def test_resume_refusals_carry_their_fields_and_read_as_flags_for_the_cli(tmp_path):
    build_atlas({0: weights()}, directions(), tmp_path / "a", k=3, progress=False)
    with pytest.raises(AtlasError) as caught:
        build_atlas({0: weights()}, directions(), tmp_path / "a", k=3, progress=False)
    assert caught.value.fields == ("resume", "out")
    assert str(caught.value) == f"atlas dir {tmp_path / 'a'} exists; resume it with resume=True or use a new out directory"
    assert message_for(caught.value, FLAGS) == f"atlas dir {tmp_path / 'a'} exists; resume it with --resume or use a new --out"
    with pytest.raises(AtlasError) as caught:
        build_atlas({0: weights()}, directions(), tmp_path / "a", k=2, resume=True, progress=False)
    index = tmp_path / "a" / "index.json"
    assert caught.value.fields == ("k", "out") and f"k: 3 (in {index}) != 2 (k)" in str(caught.value)
    assert f"k: 3 (in {index}) != 2 (--top)" in message_for(caught.value, FLAGS)


def test_the_eigen_command_prints_the_flag(tmp_path, capsys):
    model = build_model(tiny_config(d_model=32))
    model.save_pretrained(tmp_path / "m")
    argv = ["eigen", "--checkpoint", str(tmp_path / "m"), "--all-tokens", "--layer", "0", "--out", str(tmp_path / "a"),
            "--quiet", "--top", "2"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (f"bilinear-lens eigen: error: atlas dir {tmp_path / 'a'} exists; "
                                       "resume it with --resume or use a new --out\n")
