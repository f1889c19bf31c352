"""The eigen benchmark runs end to end at its --quick sizes and prints every figure it promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~40 s of CPU (trains the tiny recipe 40 steps on first use, two weight kinds)
def test_eigen_benchmark_quick_atlas_section():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.eigen", "--quick", "--only", "atlas", "--repeats", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "sgemm measured now:" in out
    for label in ("Gaussian", "trained (tiny-quick, layer 0, token directions)"):
        section = out.split(f"weights: {label}")[1]
        assert "today: eigendecompose_directions" in section and "atlas: packed B + block Krylov" in section
        assert "time ratio (baseline/ours)" in section and "% of sgemm rate" in section
        # the atlas's accuracy figures, parsed: float32 eigenpairs agree to far better than the goals
        accuracy = section.split("max rel eigenvalue error ")[1].split(";")[0]
        assert float(accuracy) < 1e-3


def test_eigen_benchmark_atlas_variant_reports_time_memory_and_pairs(tmp_path):
    from safetensors.torch import load_file

    from benchmarks import eigen

    file = tmp_path / "atlas.safetensors"
    run = eigen._atlas_variant("atlas", 32, 48, 20, "random", str(file), "cpu")
    assert run["seconds"] > 0 and run["total_peak_mb"] > 0 and run["extra_peak_mb"] >= 0
    pairs = load_file(file)
    assert pairs["eigenvalues"].shape == (20, eigen.TOP_K) and pairs["eigenvectors"].shape == (20, 32, eigen.TOP_K)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal is for machines without it")
def test_eigen_benchmark_refuses_cuda_without_it(capsys):
    from benchmarks import eigen

    with pytest.raises(SystemExit) as exit_info:
        eigen.main(["--quick", "--only", "atlas", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device 'cuda': CUDA is not available" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (this machine has none)")
def test_eigen_benchmark_quick_on_cuda():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.eigen", "--quick", "--only", "atlas", "--repeats", "1", "--device", "cuda"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on cuda:0 (" in proc.stdout and "peak allocated device memory" in proc.stdout
    for section in proc.stdout.split("weights: ")[1:]:
        assert float(section.split("max rel eigenvalue error ")[1].split(";")[0]) < 1e-3


@pytest.mark.parametrize("extra", [[], ["--sae-feature"]])
def test_ablation_benchmark_agrees_with_the_loop_at_toy_sizes(extra, capsys):
    from benchmarks import ablation

    argv = ["--d-model", "16", "--d-mlp", "24", "--d-vocab", "40", "--batch", "2", "--pos", "8", "--repeats", "1", "--all-layers"]
    assert ablation.main(argv + extra) == 0  # exit 1 when the sweep and the loop disagree beyond 1e-5
    out = capsys.readouterr().out
    assert "loop/sweep" in out and ("SAE feature" in out) == bool(extra)
    assert len([line for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]) == 2  # a row per layer
