"""Bad input to the weight-space analysis (eigendecompositions, the atlas, SAE loading, the
report, the ``eigen``/``report`` commands) is a one-line error naming the argument or flag and
the value: never a raw torch/LAPACK/ARPACK traceback, never a silently wrong result."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bilinear_lens import cli
from bilinear_lens.files.serialized import CheckpointError
from bilinear_lens.models.model import build_model
from bilinear_lens.sae.config import SAEConfig
from bilinear_lens.sae.model import SAE, load_sae, save_sae
from bilinear_lens.views.report import build_report, write_report
from bilinear_lens.weights.atlas import build_atlas, model_atlas
from bilinear_lens.weights.atlas_store import AtlasError
from bilinear_lens.weights.batched_eigen import batched_top_eigenpairs
from bilinear_lens.weights.eigen import eigendecompose, eigendecompose_directions, top_eigenvectors
from bilinear_lens.weights.tensor import BilinearWeights
from conftest import tiny_config

D = 12


def weights(d: int = D, d_mlp: int = 20, seed: int = 0, scale: float = 1.0) -> BilinearWeights:
    g = torch.Generator().manual_seed(seed)
    return BilinearWeights(*(scale * torch.randn(*shape, generator=g) for shape in ((d, d_mlp), (d, d_mlp), (d_mlp, d))))


def directions(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_config(d_vocab=40, n_layers=1)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "m"
    model.save_pretrained(path)
    return path


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI, expect exit 2 and one error line; return it."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---- 1. devices: the project's one rule, names or torch.device objects ----


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_eigendecompose_directions_refuses_cuda_without_cuda(device) -> None:
    with pytest.raises(ValueError, match=r"^device 'cuda(:\d)?': CUDA is not available"):
        eigendecompose_directions(weights(), directions(), device=device)


@pytest.mark.parametrize("device", ["tpu", "gpu", 3])
def test_eigendecompose_directions_refuses_unknown_devices(device) -> None:
    with pytest.raises(ValueError, match=rf"^device {device!r} is not one of auto, cpu, cuda, cuda:N"):
        eigendecompose_directions(weights(), directions(), device=device)


def test_device_objects_and_names_are_accepted() -> None:
    ref = eigendecompose_directions(weights(), directions(), k=2)
    for device in ("cpu", "auto" if not torch.cuda.is_available() else "cpu", torch.device("cpu")):
        got = eigendecompose_directions(weights(), directions(), k=2, device=device)
        torch.testing.assert_close(got.eigenvalues, ref.eigenvalues)


def test_build_atlas_and_model_atlas_refuse_bad_devices(tmp_path, model) -> None:
    with pytest.raises(ValueError, match=r"^device 'tpu' is not one of"):  # the parameter (the CLI adds its flag)
        build_atlas({0: weights()}, directions(), tmp_path / "a", k=2, device="tpu", progress=False)
    with pytest.raises(ValueError, match=r"^device 'tpu' is not one of"):
        model_atlas(model, tmp_path / "b", tokens=[1, 2], k=2, device="tpu", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- 2. dtypes: float32 / float64 only ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int32])
def test_eigendecompose_directions_refuses_other_dtypes(dtype) -> None:
    """int32 used to truncate every Q to zeros and return all-zero eigenvalues silently."""
    with pytest.raises(ValueError, match=rf"^dtype={dtype!r} is not supported: .*float32 or torch.float64"):
        eigendecompose_directions(weights(), directions(), dtype=dtype)


def test_eigendecompose_directions_refuses_half_precision_weights_by_default() -> None:
    w = weights()
    half = BilinearWeights(w.W_in.bfloat16(), w.W_gate.bfloat16(), w.W_out.bfloat16())
    with pytest.raises(ValueError, match=r"^the weights are torch.bfloat16: .*; pass dtype=torch.float32"):
        eigendecompose_directions(half, directions())
    assert eigendecompose_directions(half, directions(), k=1, dtype=torch.float32).eigenvalues.dtype == torch.float32
    with pytest.raises(ValueError, match=r"^the weights are torch.bfloat16: .*convert them"):
        top_eigenvectors(half, directions(1)[0], k=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int64])
def test_eigendecompose_refuses_other_dtypes(dtype) -> None:
    with pytest.raises(ValueError, match=rf"^Q.dtype={dtype!r} is not supported"):
        eigendecompose(torch.eye(4).to(dtype))


def test_build_atlas_refuses_bfloat16(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"^dtype=torch.bfloat16 is not supported"):
        build_atlas({0: weights()}, directions(), tmp_path / "a", k=2, dtype=torch.bfloat16, progress=False)


# ---- 3. non-finite inputs: refused, naming the rows ----


def test_eigendecompose_refuses_nan_naming_rows() -> None:
    Q = torch.eye(4)
    Q[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^Q contains NaN or inf in rows \[2\] \(1 of 4\)$"):
        eigendecompose(Q)
    batch = torch.eye(3).repeat(5, 1, 1)
    batch[3, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^Q contains NaN or inf in matrices \[3\] \(1 of 5\)$"):
        eigendecompose(batch)


def test_eigendecompose_directions_refuses_nan_directions() -> None:
    U = directions(4)
    U[1, 0], U[3, 5] = float("nan"), float("-inf")
    with pytest.raises(ValueError, match=r"^U contains NaN or inf in rows \[1, 3\] \(2 of 4\)$"):
        eigendecompose_directions(weights(), U)


def test_eigendecompose_directions_refuses_nan_weights() -> None:
    w = weights()
    w.W_gate[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^W_gate contains NaN or inf in rows \[0\]"):
        eigendecompose_directions(w, directions())


def test_build_atlas_refuses_nan_directions_before_writing(tmp_path) -> None:
    U = directions(4)
    U[2] = float("nan")
    with pytest.raises(ValueError, match=r"^directions contains NaN or inf in rows \[2\] \(1 of 4\)$"):
        build_atlas({0: weights()}, U, tmp_path / "a", k=2, progress=False)
    assert not (tmp_path / "a").exists()


def test_top_eigenvectors_refuses_nan_direction() -> None:
    u = directions(1)[0]
    u[4] = float("nan")
    for method in ("dense", "lanczos", "block"):
        with pytest.raises(ValueError, match=r"^u contains NaN or inf at entries \[4\] \(1 of 12\)$"):
            top_eigenvectors(weights(), u, k=2, method=method)


# ---- 4. solver arguments ----


@pytest.mark.parametrize("name, value", [("block_size", 0), ("block_size", -3), ("max_basis", 0), ("maxiter", 0)])
def test_top_eigenvectors_refuses_bad_solver_sizes(name, value) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= 1, got {value}$"):
        top_eigenvectors(weights(), directions(1)[0], k=2, method="block", **{name: value})


@pytest.mark.parametrize("method", ["lanczos", "block", "dense"])
def test_zero_interaction_matrix_has_zero_eigenvalues(method) -> None:
    """A zero u (or zero weights) gives Q = 0: every eigenvalue is exactly 0 (ARPACK used
    to fail with 'error -9: starting vector is zero')."""
    for w, u in ((weights(), torch.zeros(D)), (weights(scale=0.0), directions(1)[0])):
        eig = top_eigenvectors(w, u, k=3, method=method)
        assert torch.equal(eig.eigenvalues, torch.zeros(3))
        torch.testing.assert_close(eig.eigenvectors.T @ eig.eigenvectors, torch.eye(3))


def test_batched_top_eigenpairs_refuses_a_single_matrix() -> None:
    with pytest.raises(ValueError, match=r"^Q must be \[n, d, d\] \(a batch of symmetric matrices\), got shape \(4, 4\)$"):
        batched_top_eigenpairs(torch.eye(4), k=2)
    with pytest.raises(ValueError, match=r"^Q.dtype=torch.bfloat16"):
        batched_top_eigenpairs(torch.eye(4, dtype=torch.bfloat16)[None], k=2)


# ---- 5. atlas --out that is a file; --resume without --out ----


def test_atlas_out_that_is_a_file_is_an_atlas_error(tmp_path, model) -> None:
    file = tmp_path / "a_file.txt"
    file.write_text("x")
    with pytest.raises(AtlasError, match="^" + re.escape(f"atlas dir {file} is a file, not a directory; use a new out directory") + "$"):
        model_atlas(model, file, tokens=[1], k=2, progress=False)
    with pytest.raises(AtlasError, match="^" + re.escape(f"atlas dir {file / 'sub'}: {file} is a file, not a directory")):
        build_atlas({0: weights()}, directions(), file / "sub", k=2, progress=False)
    assert file.read_text() == "x"


def test_cli_atlas_out_that_is_a_file(checkpoint, tmp_path, capsys) -> None:
    file = tmp_path / "a_file.txt"
    file.write_text("x")
    err = cli_error(capsys, "eigen", "--checkpoint", str(checkpoint), "--all-tokens", "--top", "2", "--out", str(file), "--quiet")
    assert f"atlas dir {file} is a file, not a directory; use a new --out" in err


@pytest.mark.parametrize("flag", [["--resume"], ["--shard-size", "4"]])
def test_cli_atlas_flags_need_out(checkpoint, capsys, flag) -> None:
    err = cli_error(capsys, "eigen", "--checkpoint", str(checkpoint), "--token-id", "3", *flag)
    assert f"{flag[0]} needs --out" in err


# ---- 6. flags named in messages; --top above d_model refused by every method ----


@pytest.mark.parametrize("method", ["lanczos", "dense", "block", "auto"])
def test_cli_top_above_d_model_names_the_flag(checkpoint, capsys, method) -> None:
    err = cli_error(capsys, "eigen", "--checkpoint", str(checkpoint), "--token-id", "3", "--top", "100", "--method", method)
    assert "--top must be in [1, 32]" in err and "got 100" in err


def test_cli_top_equal_to_d_model_works(checkpoint, capsys) -> None:
    assert cli.main(["eigen", "--checkpoint", str(checkpoint), "--token-id", "3", "--top", "32", "--n-tokens", "2"]) == 0
    assert "top 32 eigenvectors" in capsys.readouterr().out


def test_report_n_eigenvectors_above_d_model_names_the_flag(model) -> None:
    model.tokenizer = object()  # checked for presence only before the argument checks
    try:
        with pytest.raises(ValueError, match=r"^n_eigenvectors \(--n-eigenvectors\) must be in \[1, 32\].*got 1000$"):
            build_report(model, n_eigenvectors=1000, progress=False)
    finally:
        model.tokenizer = None


# ---- 7. SAE weights with NaN ----


def test_load_sae_refuses_non_finite_weights(tmp_path, checkpoint, capsys) -> None:
    sae = SAE(SAEConfig(d_in=32, d_sae=8, hook_name="blocks.0.hook_resid_post", k=2))
    with torch.no_grad():
        sae.W_dec.normal_(generator=torch.Generator().manual_seed(0))
        sae.W_dec[3, 1] = float("nan")
    save_sae(sae, tmp_path / "sae")
    weights_file = tmp_path / "sae" / "sae_weights.safetensors"
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{weights_file}: tensor W_dec holds non-finite values (1 NaN, 0 inf)") + "$"):
        load_sae(tmp_path / "sae")
    err = cli_error(capsys, "eigen", "--checkpoint", str(checkpoint), "--sae", str(tmp_path / "sae"), "--feature", "3")
    assert f"--sae {tmp_path / 'sae'}: {weights_file}: tensor W_dec holds non-finite values" in err


# ---- 8. write_report to a directory ----


def test_write_report_to_a_directory_names_the_path(tmp_path, model) -> None:
    (tmp_path / "adir").mkdir()
    with pytest.raises(ValueError, match="^" + re.escape(f"report path {tmp_path / 'adir'} is a directory; give the HTML file to write") + "$"):
        write_report(model, tmp_path / "adir", progress=False)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="^" + re.escape(f"report path {tmp_path / 'f' / 'r.html'}: {tmp_path / 'f'} is a file")):
        write_report(model, tmp_path / "f" / "r.html", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "f"]
