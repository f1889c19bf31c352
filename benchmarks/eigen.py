"""Benchmark: the eigen atlas vs today's path; factored / matrix-free interaction matrices
vs the dense-tensor baseline.

    python -m benchmarks.eigen                 # full sizes (~30 minutes on 2 cores, +5 to train (0)'s model once)
    python -m benchmarks.eigen --only atlas    # (0) only (~15 minutes with the default 3 repeats)
    python -m benchmarks.eigen --only stage    # (0b) only: the top-k stage on formed Q
    python -m benchmarks.eigen --quick         # small sizes, seconds
    python -m benchmarks.eigen --only atlas --device cuda   # (0) and (0b) on a GPU

(0) Top-8 eigenpairs (by |lambda|) of Q(u) for 4096 directions at d_model 512, d_mlp
    2048, float32, median of ``--repeats`` runs: today's ``eigendecompose_directions``
    (factored Q chunks + full ``eigh``) vs ``build_atlas`` (packed symmetric B + GEMMs +
    batched block Krylov, shards written to a temp dir), on random Gaussian weights (random
    directions) and on a *trained* model: layer 0 of ``training/configs/tinystories-1l-cpu.toml``
    (1 layer, d 512, d_mlp 2048, vocabulary 4096, ~5 epochs of the TinyStories sample in
    ``../shared/data``), all 4096 token directions. The model is trained on first use
    (~5 minutes on 2 idle cores, 1.1-1.3 s/step; 2-3x on shared cores) into
    ``benchmarks/out/ts1l-cpu`` and reused; ``--trained-checkpoint DIR`` takes any bilinear checkpoint instead (e.g. a converted paper model). ``--quick``
    trains the tiny recipe for 40 steps instead. Accuracy of the atlas against today's
    exact result: max relative eigenvalue error and the largest principal angle between
    the two top-8 eigenvector subspaces (max and 99th percentile over directions). The
    machine's sgemm rate is measured in the same run; the atlas' FLOP fraction counts only
    its two GEMM stages (building the packed B, ``2 d_mlp d P``, and contracting it, ``2 n d
    P``, ``P ~ d^2 / 2``), so it is a lower bound.

(0b) The top-k stage alone, on formed ``Q(u)`` (``n`` directions of the two weight sets of
    (0)), all variants in this process, interleaved (order reversed every repeat),
    medians: full batched ``eigh`` vs ``batched_top_eigenpairs`` with the previous
    parameters (block 12, 10 steps) and with today's defaults, at the atlas' tol.

``--device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) runs sections (0) and (0b) there: the
weights and directions are moved first (not timed), the clock stops after
``torch.cuda.synchronize``, the sgemm rate is the device's, and on CUDA "extra peak" is
the device memory the variant allocated beyond what it held before
(``torch.cuda.max_memory_allocated``), not host RSS.

Each variant runs in its own subprocess on the same seeded random Gaussian weights
(float32). Time: wall-clock of the variant only (weight generation excluded). Memory:
*extra peak resident memory* of the variant: the process' peak RSS (``VmHWM``) is reset
with ``/proc/self/clear_refs`` after the weights exist, and the reported number is the
peak reached during the variant minus the resident size before it. It counts every
allocation (torch, numpy, LAPACK/ARPACK workspaces), not only tensors; the weights
themselves, shared by all variants, are excluded (total peak RSS is printed too).

(1) ``Q(u)`` for every vocabulary direction, each consumed by the same cheap reduction
    (its Frobenius norm): ours streams chunks from ``iter_interaction_matrices``; the
    naive way (Pearce et al.'s code) builds the dense ``B``, symmetrizes it and contracts
    it with all directions in one einsum, materializing all ``n_dirs d^2`` numbers.
(2) top-8 eigenpairs (largest |lambda|) of one ``Q(u)``: matrix-free (ARPACK Lanczos and
    the torch block Krylov solver) vs forming ``Q`` and calling dense ``eigh``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

SIZES = {
    "full": {"atlas": (512, 2048, 4096), "stage": (512, 2048, 128), "vocab": (512, 2048, 4096), "few": (512, 2048, 64), "eig": (4096, 16384)},
    "quick": {"atlas": (64, 256, 256), "stage": (128, 512, 32), "vocab": (128, 512, 512), "few": (128, 512, 16), "eig": (512, 2048)},
}
TOP_K = 8


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _weights(d_model: int, d_mlp: int, seed: int = 0) -> Any:
    """Gaussian weights (``W / sqrt(fan_in)``)."""
    from bilinear_lens.weights.tensor import BilinearWeights

    gen = torch.Generator().manual_seed(seed)
    mats = [torch.randn(a, b, generator=gen) / a**0.5 for a, b in ((d_model, d_mlp), (d_model, d_mlp), (d_mlp, d_model))]
    return BilinearWeights(*mats)


REPO = Path(__file__).resolve().parents[1]
TRAINED_RECIPES = {  # benchmarks/out/<name>: recipe and overrides
    "ts1l-cpu": ("training/configs/tinystories-1l-cpu.toml", []),
    "tiny-quick": ("training/configs/tiny.toml", ["train.steps=40", "train.eval_every=40", "train.checkpoint_every=40"]),
}


def trained_checkpoint(quick: bool) -> Path:
    """The trained model of section (0): trained by its recipe on first use, then reused."""
    from bilinear_lens.training.config import load_run_config
    from bilinear_lens.training.loop import train

    name = "tiny-quick" if quick else "ts1l-cpu"
    out = REPO / "benchmarks" / "out" / name
    if (out / "final" / "model.safetensors").exists():
        return out / "final"
    recipe, overrides = TRAINED_RECIPES[name]
    cfg = load_run_config(REPO / recipe, overrides + [f"data.cache_dir={REPO / 'benchmarks' / 'out' / 'data_cache'}"])
    source = cfg.data.source
    if source != "synthetic" and not Path(source).exists():
        raise SystemExit(f"benchmarks.eigen: the trained-model rows need {source} (the TinyStories sample "
                         "beside the repo) to train on, or --trained-checkpoint DIR (any bilinear checkpoint)")
    print(f"training the benchmark model ({recipe}) into {out} (first use only)", flush=True)
    return train(cfg, out, progress=False).final_checkpoint


def _weights_and_directions(source: str, d_model: int, d_mlp: int, n_dirs: int, device: str = "cpu") -> tuple[Any, torch.Tensor]:
    """``("random", ...)``: Gaussian weights and directions; a checkpoint path: its layer-0
    MLP and all of its token directions (``n_dirs`` and the dims are then the model's).
    Both are drawn or loaded on the CPU (the same numbers on every device), then moved."""
    if source == "random":
        w, U = _weights(d_model, d_mlp), torch.randn(n_dirs, d_model, generator=torch.Generator().manual_seed(1))
    else:
        from bilinear_lens.models.model import load_model
        from bilinear_lens.weights.directions import token_directions
        from bilinear_lens.weights.tensor import BilinearWeights

        model = load_model(source)
        w, U = BilinearWeights.from_module(model.blocks[0].mlp), token_directions(model)
    return w.to(device, torch.float32), U.to(device, torch.float32)


def _label(source: str) -> str:
    return "Gaussian" if source == "random" else f"trained ({Path(source).parent.name}, layer 0, token directions)"


def _synchronize(device: torch.device) -> None:
    """Wait for queued device work, so the clock measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sgemm_gflops(n: int, device: torch.device, repeats: int = 3) -> float:
    """Median float32 matmul rate of an ``n x n`` GEMM on ``device`` (GFLOP/s)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


class _PeakMemory:
    """Extra peak memory of the code inside (MB) and the total peak: host RSS on the CPU
    (``VmHWM`` reset through ``/proc/self/clear_refs``: every allocation counts, LAPACK
    workspaces too), allocated device memory on CUDA (the host side is then small)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.before = _status_kb("VmRSS") / 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak-RSS counter
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.peak = _status_kb("VmHWM") / 1024
        self.extra = max(self.peak - self.before, 0.0)


def _atlas_variant(name: str, d_model: int, d_mlp: int, n_dirs: int, source: str, result_file: str, device: str = "cpu") -> dict[str, Any]:
    """One timed run of today's path or the atlas on ``device``; the top-8 pairs go to
    ``result_file``. The atlas' time includes writing its shards (it streams them)."""
    import tempfile

    from safetensors.torch import save_file

    from bilinear_lens.weights.atlas import build_atlas
    from bilinear_lens.weights.eigen import eigendecompose_directions

    dev = torch.device(device)
    w, U = _weights_and_directions(source, d_model, d_mlp, n_dirs, device)
    torch.linalg.eigh(torch.eye(4, device=dev))  # load LAPACK / cuSOLVER before the measurement
    with tempfile.TemporaryDirectory() as tmp:
        _synchronize(dev)
        with _PeakMemory(dev) as memory:
            start = time.perf_counter()
            if name == "today":
                eig = eigendecompose_directions(w, U, k=TOP_K)
                values, vectors = eig.eigenvalues, eig.eigenvectors
            else:
                atlas = build_atlas({0: w}, U, f"{tmp}/atlas", k=TOP_K, progress=False)
                values, vectors = atlas.layer_tensors(0, "eigenvalues"), atlas.layer_tensors(0, "eigenvectors")
            _synchronize(dev)
            seconds = time.perf_counter() - start
    save_file({"eigenvalues": values.cpu().contiguous(), "eigenvectors": vectors.cpu().contiguous()}, result_file)
    return {"seconds": seconds, "extra_peak_mb": memory.extra, "total_peak_mb": memory.peak}


def _accuracy(today: dict[str, torch.Tensor], atlas: dict[str, torch.Tensor]) -> str:
    """Max relative eigenvalue error; largest principal angle between top-k subspaces.

    Eigenvalues are compared as sets (each row sorted by value): two eigenvalues of opposite
    sign and nearly equal ``|lambda|`` may come in either order by ``|lambda|``, and a
    positional comparison would count that tie as an error of 2 (seen on the trained model).
    """
    ref, got = today["eigenvalues"].sort(-1).values, atlas["eigenvalues"].sort(-1).values
    rel = ((got - ref).abs() / ref.abs()).max().item()
    # sin of the largest principal angle = ||(I - V V^T) W||_2 (V, W orthonormal). Not
    # arccos of the smallest cosine: near 1 it turns float32 rounding of the vectors
    # (~1e-7) into ~1e-3 rad, which is what eigh against itself gave.
    V, W = today["eigenvectors"].double(), atlas["eigenvectors"].double()
    sines = torch.linalg.matrix_norm(W - V @ (V.mT @ W), ord=2)
    angles = torch.arcsin(sines.clamp(max=1.0))
    return (f"max rel eigenvalue error {rel:.1e}; subspace angle max {angles.max().item():.1e} rad, "
            f"99th pct {angles.quantile(0.99).item():.1e} rad")


def _atlas_section(d_model: int, d_mlp: int, n_dirs: int, repeats: int, trained: str, in_process: bool = False, device: str = "cpu") -> None:
    """Print section (0) for Gaussian weights and the ``trained`` checkpoint on ``device``;
    ``in_process`` runs the variants here instead of in fresh subprocesses (``--quick``:
    seconds, but peak memory then includes earlier variants)."""
    import tempfile

    from safetensors.torch import load_file

    from bilinear_lens.weights.packed_tensor import packed_size

    gflops = _sgemm_gflops(2048 if d_model >= 256 else 512, torch.device(device))
    print(f"(0) top-{TOP_K} of Q(u) on {_device_name(device)}, median of {repeats}; sgemm measured now: {gflops:.0f} GFLOP/s")
    for source in ("random", trained):
        w, U = _weights_and_directions(source, d_model, d_mlp, n_dirs)
        n, d, h = U.shape[0], w.d_model, w.d_mlp
        gemm_flops = 2 * (h + n) * d * packed_size(d)
        runs: dict[str, list[dict[str, Any]]] = {"today": [], "atlas": []}
        results = {}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(repeats):
                for name in runs:  # interleaved, so both see the same machine load
                    file = f"{tmp}/{name}.safetensors"
                    args = (name, d_model, d_mlp, n_dirs, source, file, device)
                    run = _atlas_variant(*args) if in_process else _run(*args)
                    runs[name].append(run)
                    results[name] = load_file(file)
        med = {name: sorted(r, key=lambda x: x["seconds"])[len(r) // 2] for name, r in runs.items()}
        print(f"  weights: {_label(source)}: {n} directions, d_model {d}, d_mlp {h}")
        print(_row("today: eigendecompose_directions", med["today"]))
        print(_row("atlas: packed B + block Krylov", med["atlas"]))
        fraction = gemm_flops / med["atlas"]["seconds"] / (gflops * 1e9)
        print(_ratios(med["today"], med["atlas"]) + f"   atlas at >= {100 * fraction:.0f}% of sgemm rate")
        print("  accuracy vs today's exact eigh: " + _accuracy(results["today"], results["atlas"]) + "\n")


def _stage_section(d_model: int, d_mlp: int, n_dirs: int, repeats: int, trained: str, device: str = "cpu") -> None:
    """Print section (0b): the top-k stage on formed ``Q`` on ``device`` (see the module docstring)."""
    import os

    from bilinear_lens.weights.batched_eigen import batched_top_eigenpairs
    from bilinear_lens.weights.eigen import sort_by_magnitude
    from bilinear_lens.weights.tensor import interaction_matrices

    def krylov(**params: int) -> Any:
        return lambda Q: batched_top_eigenpairs(Q, TOP_K, tol=1e-4, generator=torch.Generator(device=Q.device).manual_seed(0), **params).eig

    variants = {"full batched eigh": lambda Q: sort_by_magnitude(*torch.linalg.eigh(Q)).top(TOP_K),
                "Krylov b12 s10 (previous)": krylov(block_size=12, steps=10), "Krylov defaults": krylov()}
    dev = torch.device(device)
    print(f"(0b) top-{TOP_K} stage on {n_dirs} formed Q(u) on {_device_name(device)}, median of {repeats}")
    for source in ("random", trained):
        w, U = _weights_and_directions(source, d_model, d_mlp, n_dirs, device)
        rows = torch.randperm(U.shape[0], generator=torch.Generator().manual_seed(2))[:n_dirs]
        Q = interaction_matrices(w, U[rows.to(dev)])
        times: dict[str, list[float]] = {name: [] for name in variants}
        results = {}
        for repeat in range(repeats):
            for name in list(variants)[:: 1 if repeat % 2 == 0 else -1]:  # alternate the order
                _synchronize(dev)
                start = time.perf_counter()
                results[name] = variants[name](Q)
                _synchronize(dev)
                times[name].append(time.perf_counter() - start)
        print(f"  weights: {_label(source)}, d_model {w.d_model}, d_mlp {w.d_mlp}; load average {os.getloadavg()[0]:.1f} after")
        ref = results["full batched eigh"]
        for name, t in times.items():
            med = sorted(t)[len(t) // 2]
            got = results[name]
            accuracy = _accuracy({k: v.cpu() for k, v in ref._asdict().items()}, {k: v.cpu() for k, v in got._asdict().items()})
            print(f"  {name:<26} {med:7.2f} s  {1000 * med / Q.shape[0]:6.2f} ms/matrix  x{sorted(times['full batched eigh'])[repeats // 2] / med:5.2f} vs eigh   {accuracy}")
    print()


def _device_name(device: str) -> str:
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _variant(name: str, d_model: int, d_mlp: int, n_dirs: int) -> dict[str, Any]:
    """Run one variant in this process; returns time, memory and a result to cross-check."""
    from bilinear_lens.weights.eigen import top_eigenvectors
    from bilinear_lens.weights.tensor import iter_interaction_matrices

    w = _weights(d_model, d_mlp)
    U = torch.randn(max(n_dirs, 1), d_model, generator=torch.Generator().manual_seed(1))
    torch.linalg.eigh(torch.eye(4))  # load LAPACK before the measurement
    rss_before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    start = time.perf_counter()
    if name == "naive_all":
        B = torch.einsum("ha,ih,jh->aij", w.W_out, w.W_in, w.W_gate)
        B = (B + B.transpose(1, 2)) / 2
        Q = torch.einsum("na,aij->nij", U, B)
        result = torch.linalg.matrix_norm(Q)
    elif name == "ours_all":
        result = torch.empty(n_dirs)
        for chunk in iter_interaction_matrices(w, U):
            result[chunk.start : chunk.stop] = torch.linalg.matrix_norm(chunk.matrices)
    else:  # top-k: dense, lanczos, block
        eig = top_eigenvectors(w, U[0], TOP_K, method=name)
        result = torch.cat([eig.eigenvalues, eig.eigenvectors.flatten()])
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return {
        "seconds": seconds,
        "extra_peak_mb": max(peak - rss_before, 0) / 1024,
        "total_peak_mb": peak / 1024,
        "result": result.tolist(),
    }


def _run(name: str, d_model: int, d_mlp: int, n_dirs: int = 1, *atlas_args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.eigen", "--variant", name, str(d_model), str(d_mlp), str(n_dirs), *atlas_args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row(label: str, r: dict[str, Any]) -> str:
    return f"  {label:<34} {r['seconds']:8.2f} s   extra peak {r['extra_peak_mb']:9.1f} MB   (total {r['total_peak_mb']:.0f} MB)"


def _ratios(base: dict[str, Any], ours: dict[str, Any]) -> str:
    time_ratio = base["seconds"] / ours["seconds"]
    mem_ratio = base["extra_peak_mb"] / max(ours["extra_peak_mb"], 1e-3)
    return f"  => time ratio (baseline/ours) {time_ratio:6.2f}x   extra-peak-memory ratio {mem_ratio:8.1f}x"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, runs in seconds")
    parser.add_argument("--only", choices=("atlas", "stage", "factored", "topk"), help="run one section: (0), (0b), (1) or (2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per atlas variant; the median is shown (default 3)")
    parser.add_argument("--trained-checkpoint", metavar="DIR", help="bilinear checkpoint for the trained-weights rows "
                        "(default: train training/configs/tinystories-1l-cpu.toml once into benchmarks/out)")
    parser.add_argument("--device", default="cpu", help="where sections (0) and (0b) compute: cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--variant", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        name, *rest = args.variant
        run = _atlas_variant if name in ("today", "atlas") else _variant
        print(json.dumps(run(name, *map(int, rest[:3]), *rest[3:])))
        return

    from bilinear_lens.distributed import resolve_device

    try:
        device = str(resolve_device(args.device, what="--device"))
    except ValueError as err:
        parser.error(str(err))
    sizes = SIZES["quick" if args.quick else "full"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    peak = "allocated device memory" if device.startswith("cuda") else "RSS"
    print(f"time: wall-clock of the variant; extra peak: peak {peak} during it minus {peak} before it\n")
    if args.only in (None, "atlas", "stage"):
        trained = str(args.trained_checkpoint or trained_checkpoint(args.quick))
    if args.only in (None, "atlas"):
        _atlas_section(*sizes["atlas"], repeats=args.repeats, trained=trained, in_process=args.quick, device=device)
    if args.only in (None, "stage"):
        _stage_section(*sizes["stage"], repeats=args.repeats, trained=trained, device=device)
    if args.only in ("atlas", "stage"):
        return

    for key, title in (("vocab", "all vocabulary directions"), ("few", "a few directions")) if args.only != "topk" else ():
        d_model, d_mlp, n_dirs = sizes[key]
        print(f"(1) random Gaussian weights: Q(u) for {title}: d_model {d_model}, d_mlp {d_mlp}, n_dirs {n_dirs} (consumer: ||Q||_F)")
        naive = _run("naive_all", d_model, d_mlp, n_dirs)
        ours = _run("ours_all", d_model, d_mlp, n_dirs)
        gap = (torch.tensor(naive["result"]) - torch.tensor(ours["result"])).abs().max().item()
        print(_row("naive: dense B, one einsum", naive))
        print(_row("ours: factored, chunked stream", ours))
        print(_ratios(naive, ours) + f"   (max |norm difference| {gap:.1e})\n")

    if args.only == "factored":
        return
    d_model, d_mlp = sizes["eig"]
    print(f"(2) random Gaussian weights: top-{TOP_K} eigenpairs by |lambda| of one Q(u): d_model {d_model}, d_mlp {d_mlp}")
    dense = _run("dense", d_model, d_mlp)
    print(_row("dense: form Q, eigh", dense))
    ref = torch.tensor(dense["result"])
    for method in ("block", "lanczos"):
        r = _run(method, d_model, d_mlp)
        got = torch.tensor(r["result"])
        rel = ((got[:TOP_K] - ref[:TOP_K]).abs() / ref[:TOP_K].abs()).max().item()
        overlap = (got[TOP_K:].view(d_model, TOP_K) * ref[TOP_K:].view(d_model, TOP_K)).sum(0).abs().min().item()
        print(_row(f"matrix-free: {method}", r))
        print(_ratios(dense, r) + f"   (max rel eigenvalue diff {rel:.1e}, min |overlap| {overlap:.6f})")


if __name__ == "__main__":
    main()
