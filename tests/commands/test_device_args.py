"""--device/--dtype/--quiet of the analysis commands (commands/common.py) and device= entry points."""

from __future__ import annotations

import argparse

import pytest
import torch

from bilinear_lens import cli
from bilinear_lens.commands.common import EIGH_DTYPES, UsageError, add_device_args, place_model, resolve_device
from bilinear_lens.models.config import DTYPES
from bilinear_lens.models.model import build_model
from bilinear_lens.weights.eigen import eigendecompose, eigendecompose_directions
from bilinear_lens.weights.tensor import interaction_matrices
from conftest import tiny_config


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
])
def test_bad_values_are_one_line_usage_errors(argv, message) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(parse(*argv))


def test_bad_dtypes_are_refused_by_the_parser_and_by_resolve_device(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        parse("--dtype", "double")
    assert done.value.code == 2
    assert "argument --dtype: invalid choice: 'double'" in capsys.readouterr().err
    # a Namespace built in Python (no parser) still gets the one-line error
    with pytest.raises(UsageError, match="--dtype 'double' is not one of float32, float64, bfloat16, float16"):
        resolve_device(argparse.Namespace(device="cpu", dtype="double"))
    with pytest.raises(ValueError, match="dtypes must be among"):
        add_device_args(argparse.ArgumentParser(), dtypes=("float64", "int8"))


def dtype_choices(command: str) -> tuple[str, ...]:
    import importlib

    parser = importlib.import_module(f"bilinear_lens.commands.{command}").build_parser()
    (action,) = [a for a in parser._actions if "--dtype" in a.option_strings]
    return tuple(action.choices)


def test_each_command_offers_the_dtypes_it_can_run() -> None:
    """eigen and report eigendecompose (torch.linalg.eigh has no float16/bfloat16 kernel on
    CPU or CUDA); ablate and polytope run in every model dtype (see the tests below)."""
    assert dtype_choices("eigen") == dtype_choices("report") == EIGH_DTYPES == ("float32", "float64")
    assert dtype_choices("ablate") == dtype_choices("polytope") == DTYPES
    with pytest.raises(RuntimeError, match="not implemented for 'Half'"):  # why: the kernel itself is missing
        torch.linalg.eigh(torch.eye(3, dtype=torch.float16))


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
    for command in ("report", "eigen"):  # ablate needs a tokenizer; polytope: tests/activations/test_polytope.py
        extra = ["--out", str(tmp_path / "r.html")] if command == "report" else ["--token-id", "7"] if command == "eigen" else []
        assert cli.main([command, "--checkpoint", str(checkpoint), *extra, "--device", "tpu"]) == 2
        assert "--device 'tpu' is not one of" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("command, extra", [
    ("eigen", ["--token-id", "7"]),
    ("eigen", ["--token-id", "7", "--out", "{tmp}/atlas"]),
    ("eigen", ["--all-tokens", "--out", "{tmp}/atlas"]),
    ("report", ["--out", "{tmp}/r.html"]),
])
def test_half_precision_is_refused_before_any_work(checkpoint, tmp_path, capsys, command, extra, dtype) -> None:
    """Before: a NotImplementedError traceback from eigh, and an atlas directory holding
    index.json. Now argparse refuses the value (exit 2), naming --dtype and the value."""
    argv = [command, "--checkpoint", str(checkpoint), *[a.format(tmp=tmp_path) for a in extra], "--dtype", dtype]
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert f"argument --dtype: invalid choice: '{dtype}' (choose from 'float32', 'float64')" in err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


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


def test_one_runtime_module_one_device_grammar() -> None:
    """Issue #22 item 5: the training environment, the backend rule and the device rule live
    in bilinear_lens.distributed; the recipe's grammar and the library's device= are that rule."""
    import importlib.util

    from bilinear_lens import distributed
    from bilinear_lens.training.config import TrainConfig

    assert importlib.util.find_spec("bilinear_lens.training.distributed") is None
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
    assert distributed.backend_for(torch.device("cuda", 0)) == "nccl"
    for name in ("auto", "cpu", "cuda", "cuda:3"):
        assert distributed.is_device_name(name) and TrainConfig(device=name).device == name
    for name in ("gpu", "cuda:", "cuda:x", "CPU", 0):
        assert not distributed.is_device_name(name)
        with pytest.raises(ValueError, match="allowed values are"):
            TrainConfig(device=name)
    assert distributed.resolve_device(torch.device("cpu"), what="device") == torch.device("cpu")
    with pytest.raises(ValueError, match="device 'gpu' is not one of auto, cpu, cuda, cuda:N"):
        eigendecompose_directions(build_model(tiny_config()).blocks[0].mlp, torch.randn(2, 32), k=2, device="gpu")
