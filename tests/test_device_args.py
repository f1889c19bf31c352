"""--device/--dtype/--quiet of the analysis commands (commands/common.py) and device= entry points."""

from __future__ import annotations

import argparse

import pytest
import torch

from bilinear_lens import cli
from bilinear_lens.commands.common import UsageError, add_device_args, place_model, resolve_device
from bilinear_lens.models.model import build_model
from bilinear_lens.weights.eigen import eigendecompose, eigendecompose_directions
from bilinear_lens.weights.tensor import interaction_matrices
from tests.conftest import tiny_config


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_device_args(parser)
    return parser.parse_args(list(argv))


def test_defaults_and_cpu() -> None:
    args = parse()
    assert (args.device, args.dtype, args.quiet) == ("auto", "float32", False)
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(args) == (expected, torch.float32)
    assert resolve_device(parse("--device", "cpu", "--dtype", "float64", "--quiet")) == (torch.device("cpu"), torch.float64)
    model = place_model(build_model(tiny_config()), parse("--device", "cpu", "--dtype", "float64"))
    assert {p.dtype for p in model.parameters()} == {torch.float64}


@pytest.mark.parametrize("argv, message", [
    (["--device", "gpu"], "--device 'gpu' is not one of auto, cpu, cuda, cuda:N"),
    (["--device", "cuda:x"], "--device 'cuda:x' is not one of"),
    (["--dtype", "double"], "--dtype 'double' is not one of float32, float64, bfloat16, float16"),
])
def test_bad_values_are_one_line_usage_errors(argv, message) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(parse(*argv))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--device 'cuda': CUDA is not available on this machine"):
        resolve_device(parse("--device", "cuda"))


@pytest.fixture
def checkpoint(tmp_path):
    return build_model(tiny_config(d_vocab=40)).save_pretrained(tmp_path / "m")


def test_eigen_cli_computes_in_the_requested_dtype(checkpoint, tmp_path, capsys) -> None:
    import json

    assert cli.main(["eigen", "--checkpoint", str(checkpoint), "--token-id", "7", "--top", "3", "--json",
                     "--device", "cpu", "--dtype", "float64"]) == 0
    rows = json.loads(capsys.readouterr().out)["eigenvectors"]
    model = build_model(tiny_config(d_vocab=40)).double()
    ref = eigendecompose(interaction_matrices(model.blocks[0].mlp, model.W_U.detach().T[[7]]))
    # float64 end to end: agreement to float64 rounding, which float32 (1e-7) would not reach
    assert [r["eigenvalue"] for r in rows] == pytest.approx(ref.eigenvalues[0, :3].tolist(), rel=1e-12)
    for command in ("report", "eigen"):  # ablate needs a tokenizer; polytope: tests/test_polytope.py
        extra = ["--out", str(tmp_path / "r.html")] if command == "report" else ["--token-id", "7"] if command == "eigen" else []
        assert cli.main([command, "--checkpoint", str(checkpoint), *extra, "--device", "tpu"]) == 2
        assert "--device 'tpu' is not one of" in capsys.readouterr().err


def test_eigendecompose_directions_device_and_dtype() -> None:
    mlp = build_model(tiny_config()).blocks[0].mlp
    U = torch.randn(3, 32)
    got = eigendecompose_directions(mlp, U, k=2, device="cpu", dtype=torch.float64)
    assert got.eigenvalues.dtype == torch.float64 and got.eigenvalues.device.type == "cpu"
    ref = eigendecompose(interaction_matrices(mlp, U).double()).top(2)
    # Q formed in float64 vs formed in float32 then widened: equal to float32 rounding
    torch.testing.assert_close(got.eigenvalues, ref.eigenvalues, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (this machine has none)")
def test_eigen_cli_and_entry_points_on_cuda(checkpoint, capsys) -> None:
    assert cli.main(["eigen", "--checkpoint", str(checkpoint), "--token-id", "7", "--device", "cuda"]) == 0
    mlp = build_model(tiny_config()).blocks[0].mlp
    got = eigendecompose_directions(mlp, torch.randn(3, 32), k=2, device="cuda")
    assert got.eigenvalues.device.type == "cuda"


def test_training_and_commands_share_one_device_rule(monkeypatch) -> None:
    from bilinear_lens import distributed

    with pytest.raises(ValueError, match="train.device 'gpu' is not one of auto, cpu, cuda, cuda:N"):
        distributed.resolve_device("gpu", what="train.device")
    assert distributed.resolve_device("cpu", what="train.device") == torch.device("cpu")
    # the commands read the rank's LOCAL_RANK like training (cuda -> cuda:<local rank>);
    # a malformed torchrun environment is named, not ignored
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(UsageError, match="LOCAL_RANK='x' must be a non-negative integer"):
        resolve_device(parse("--device", "cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_training_names_its_setting_when_cuda_is_missing() -> None:
    from bilinear_lens import distributed

    with pytest.raises(ValueError, match="train.device 'cuda:1': CUDA is not available on this machine; use auto or cpu"):
        distributed.resolve_device("cuda:1", what="train.device")
