"""Fault injection for the atlas and exports (issue 24): real SIGKILLs of ``eigen --out``
and ``convert --out``, then a rerun; the result must be byte-identical to an uninterrupted
one, with nothing corrupt and no leftovers (``.tmp-``/``.old-`` temporaries, locks).

Each trial: start the writer, wait until it is writing (the atlas' ``index.json`` exists /
the export's temporary directory appears), sleep a random time, ``kill -9``. Then check
what is on disk (every finished atlas shard must verify; the export must be the old or
the new complete directory, or recoverable hidden copies), rerun (``eigen --resume`` /
``convert``) to completion and compare every byte with the uninterrupted reference (an
export's ``model.safetensors`` header compared parsed: safetensors orders metadata keys at
random per process, :func:`content_digest`).

    python -m benchmarks.fault_injection_outputs --kills 3
    # -> "6 kills, 6 byte-identical resumes, 0 corrupt, 0 leftovers"
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bilinear_lens.cli", *args], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(*args: str) -> None:
    proc = cli(*args)
    _, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {err[-2000:]}")


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def content_digest(root: Path) -> dict[str, str]:
    """:func:`digest`, but a safetensors file by its header parsed (JSON keys sorted) and its
    data bytes: safetensors writes metadata keys in a per-process random order (a Rust
    HashMap), so two saves of the same tensors differ in header bytes only."""
    import json

    out = digest(root)
    for p in root.rglob("*.safetensors"):
        data = p.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True).encode()
        out[str(p.relative_to(root))] = hashlib.sha256(header + data[8 + n :]).hexdigest()
    return out


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".lock")
            or p.name == ".lock"]


def kill_when(proc: subprocess.Popen, ready, max_delay: float, rng: random.Random) -> bool:
    """SIGKILL ``proc`` a random time after ``ready()`` holds; False if it finished first."""
    while not ready():
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    time.sleep(rng.uniform(0, max_delay))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def atlas_trials(root: Path, model: Path, n: int, rng: random.Random) -> tuple[int, int, int, int]:
    from bilinear_lens.weights.atlas_store import SHARD_RECORD, AtlasError, EigenAtlas

    args = ["eigen", "--checkpoint", str(model), "--all-tokens", "--top", "4", "--shard-size", "32", "--quiet", "--device", "cpu"]
    finish(*args, "--out", str(root / "atlas_ref"))
    reference = digest(root / "atlas_ref")
    kills = identical = corrupt = left = 0
    for trial in range(n):
        out = root / f"atlas{trial}"
        proc = cli(*args, "--out", str(out))
        if not kill_when(proc, lambda: (out / "index.json").exists(), 4.0, rng):
            continue
        kills += 1
        atlas = EigenAtlas(out)
        for shard in out.glob("layer*"):  # every published shard verifies
            record = shard / SHARD_RECORD
            try:
                layer, start = int(shard.name[5:7]), int(shard.name[8:])
                atlas.entry(layer, row=start) if record.exists() else None
            except (AtlasError, ValueError):
                corrupt += 1
        finish(*args, "--out", str(out), "--resume")
        identical += digest(out) == reference
        left += len(leftovers(out))
    return kills, identical, corrupt, left


def export_trials(root: Path, old: Path, new: Path, n: int, rng: random.Random) -> tuple[int, int, int, int]:
    from bilinear_lens.files.serialized import CheckpointError
    from bilinear_lens.models.model import load_model

    finish("convert", str(new), "--out", str(root / "export_ref"))
    reference = content_digest(root / "export_ref")
    kills = identical = corrupt = left = 0
    for trial in range(n):
        parent = root / f"export{trial}"
        out = parent / "out"
        finish("convert", str(old), "--out", str(out))  # the export the killed convert replaces
        proc = cli("convert", str(new), "--out", str(out))
        writing = lambda: any(".tmp-" in p.name for p in parent.iterdir())  # noqa: E731
        if not kill_when(proc, writing, 0.3, rng):
            continue
        kills += 1
        if out.exists():  # else only hidden copies: the next convert recovers them
            try:
                load_model(out)
            except (CheckpointError, FileNotFoundError, ValueError):
                corrupt += 1
        state = "present" if out.exists() else "missing"
        hidden = sorted(p.name for p in parent.iterdir() if p.name != "out")
        finish("convert", str(new), "--out", str(out))
        got = content_digest(out)
        identical += got == reference
        if got != reference:
            print(f"export trial {trial}: out {state} after the kill, beside it {hidden}; differing files "
                  f"{sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))}")
        left += len(leftovers(parent))
    return kills, identical, corrupt, left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=3, help="kills of each writer (atlas, export)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export-only", action="store_true", help="skip the atlas trials")
    args = parser.parse_args(argv)
    from bilinear_lens.models.config import ModelConfig
    from bilinear_lens.models.model import build_model

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = ModelConfig(d_vocab=512, d_model=64, n_layers=2, n_heads=4, d_mlp=128, n_ctx=32, seed=0)
        build_model(small).save_pretrained(root / "atlas_model")
        big = ModelConfig(d_vocab=8000, d_model=256, n_layers=2, n_heads=4, d_mlp=512, n_ctx=64, seed=1)
        build_model(big).save_pretrained(root / "old")
        build_model(big.replace(seed=2)).save_pretrained(root / "new")
        a = atlas_trials(root, root / "atlas_model", args.kills, rng) if not args.export_only else (0, 0, 0, 0)
        e = export_trials(root, root / "old", root / "new", args.kills, rng)
    print(f"atlas: {a[0]} kills, {a[1]} byte-identical resumes, {a[2]} corrupt, {a[3]} leftovers")
    print(f"export: {e[0]} kills, {e[1]} byte-identical resumes, {e[2]} corrupt, {e[3]} leftovers")
    total = [x + y for x, y in zip(a, e)]
    print(f"{total[0]} kills, {total[1]} byte-identical resumes, {total[2]} corrupt, {total[3]} leftovers")
    return 0 if total[0] == total[1] and total[2] == total[3] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
