"""Benchmark: factored / matrix-free interaction matrices vs the dense-tensor baseline.

    python -m benchmarks.eigen          # full sizes (a few minutes on 2 cores)
    python -m benchmarks.eigen --quick  # small sizes, seconds

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
from typing import Any

import torch

SIZES = {
    "full": {"vocab": (512, 2048, 4096), "few": (512, 2048, 64), "eig": (4096, 16384)},
    "quick": {"vocab": (128, 512, 512), "few": (128, 512, 16), "eig": (512, 2048)},
}
TOP_K = 8


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _weights(d_model: int, d_mlp: int, seed: int = 0) -> Any:
    from bilinear_lens.weights.tensor import BilinearWeights

    gen = torch.Generator().manual_seed(seed)
    return BilinearWeights(
        torch.randn(d_model, d_mlp, generator=gen) / d_model**0.5,
        torch.randn(d_model, d_mlp, generator=gen) / d_model**0.5,
        torch.randn(d_mlp, d_model, generator=gen) / d_mlp**0.5,
    )


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


def _run(name: str, d_model: int, d_mlp: int, n_dirs: int = 1) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.eigen", "--variant", name, str(d_model), str(d_mlp), str(n_dirs)],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, runs in seconds")
    parser.add_argument("--variant", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        name, *dims = args.variant
        print(json.dumps(_variant(name, *map(int, dims))))
        return

    sizes = SIZES["quick" if args.quick else "full"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, random Gaussian weights")
    print("time: wall-clock of the variant; extra peak: peak RSS during it minus RSS before it\n")

    for key, title in (("vocab", "all vocabulary directions"), ("few", "a few directions")):
        d_model, d_mlp, n_dirs = sizes[key]
        print(f"(1) Q(u) for {title}: d_model {d_model}, d_mlp {d_mlp}, n_dirs {n_dirs} (consumer: ||Q||_F)")
        naive = _run("naive_all", d_model, d_mlp, n_dirs)
        ours = _run("ours_all", d_model, d_mlp, n_dirs)
        gap = (torch.tensor(naive["result"]) - torch.tensor(ours["result"])).abs().max().item()
        print(_row("naive: dense B, one einsum", naive))
        print(_row("ours: factored, chunked stream", ours))
        print(_ratios(naive, ours) + f"   (max |norm difference| {gap:.1e})\n")

    d_model, d_mlp = sizes["eig"]
    print(f"(2) top-{TOP_K} eigenpairs by |lambda| of one Q(u): d_model {d_model}, d_mlp {d_mlp}")
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
