"""Issue 24.1: one writer per atlas directory (``eigen --out``) and per export (``convert
--out``), tested with real second processes holding the lock; the issue's atlas race (a
writer that checked the directory before another finished) cannot destroy a finished atlas."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bilinear_lens import cli
from bilinear_lens.locking import LockHeldError
from bilinear_lens.models.model import BilinearTransformer, build_model
from bilinear_lens.output_locks import ATLAS_LOCK_FILE, export_lock_path
from bilinear_lens.weights.atlas import model_atlas
from bilinear_lens.weights.atlas_store import EigenAtlas
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]

# A second process holding a lock file through the package's own locking module, loaded
# from its file so the process starts in well under a second (no torch import).
HOLD_LOCK = """
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("locking", sys.argv[1])
    locking = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(locking)
    with locking.exclusive_lock(sys.argv[2], what="held"):
        print("locked", flush=True)
        sys.stdin.read()  # hold until killed
"""


def hold_lock(lock_file: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(REPO / "bilinear_lens" / "locking.py"),
                             str(lock_file)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    build_model(tiny_config(d_vocab=40)).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_second_atlas_writer_is_refused_naming_the_holder(checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "atlas"
    out.mkdir()
    holder = hold_lock(out / ATLAS_LOCK_FILE)
    args = ["eigen", "--checkpoint", str(checkpoint), "--all-tokens", "--top", "2", "--shard-size", "16",
            "--quiet", "--device", "cpu", "--out", str(out)]
    try:
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"atlas dir {out} is in use by pid {holder.pid} on host {socket.gethostname()} since 20" in err
        assert sorted(p.name for p in out.iterdir()) == [ATLAS_LOCK_FILE]  # nothing written
        with pytest.raises(LockHeldError, match=f"in use by pid {holder.pid}"):
            model_atlas(build_model(tiny_config(d_vocab=40)), out, k=2, progress=False)
    finally:
        kill(holder)
    assert cli.main(args) == 0  # a killed holder's lock is free again
    assert EigenAtlas(out).n_dirs == 40 and not (out / ATLAS_LOCK_FILE).exists()


def test_second_export_writer_is_refused_and_the_previous_export_stays(checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "export"
    assert cli.main(["convert", str(checkpoint), "--to", "hf", "--out", str(out)]) == 0
    capsys.readouterr()
    before = tree_digest(out)
    holder = hold_lock(export_lock_path(out))
    try:
        assert cli.main(["convert", str(checkpoint), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"model directory {out} is in use by pid {holder.pid} on host {socket.gethostname()}" in err
        assert tree_digest(out) == before  # the HF export is untouched
        with pytest.raises(LockHeldError, match=f"in use by pid {holder.pid}"):
            BilinearTransformer.from_pretrained(checkpoint).save_pretrained(out)
    finally:
        kill(holder)
    assert cli.main(["convert", str(checkpoint), "--out", str(out)]) == 0
    assert "model_type" not in (out / "config.json").read_text()  # now ours, not the HF layout
    assert not export_lock_path(out).exists()


# Writer A: checks the (empty) --out, then waits (as if slow) before writing its index.
SLOW_ATLAS_WRITER = """
    import sys
    from bilinear_lens.models.model import BilinearTransformer
    from bilinear_lens.weights import atlas
    real_check = atlas._check_out_dir
    def checked_then_wait(*args):
        found = real_check(*args)
        print("checked", flush=True)
        sys.stdin.readline()
        return found
    atlas._check_out_dir = checked_then_wait
    model = BilinearTransformer.from_pretrained(sys.argv[1])
    atlas.model_atlas(model, sys.argv[2], k=2, shard_size=16, progress=False)
    print("done", flush=True)
"""


@pytest.mark.slow  # a second process imports torch and the package (~15-30 s on 2 busy cores)
def test_atlas_race_cannot_destroy_a_finished_atlas(checkpoint, tmp_path, capsys) -> None:
    """The issue's race: A checked the directory, then B ran. B is refused while A holds the
    lock; A's atlas is finished and readable; a later plain B is refused by the existing
    atlas and changes no byte of it."""
    out = tmp_path / "atlas"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    a = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_ATLAS_WRITER), str(checkpoint), str(out)],
                         cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert a.stdout.readline().strip() == "checked", a.stderr.read()
        args = ["eigen", "--checkpoint", str(checkpoint), "--all-tokens", "--top", "2", "--shard-size", "16",
                "--quiet", "--device", "cpu", "--out", str(out)]
        for extra in ([], ["--resume"]):
            assert cli.main(args + extra) == 2
            assert f"is in use by pid {a.pid}" in capsys.readouterr().err
        a.stdin.write("go\n")
        a.stdin.flush()
        assert a.stdout.readline().strip() == "done"
        assert a.wait(timeout=120) == 0
    finally:
        if a.poll() is None:
            kill(a)
    finished = tree_digest(out)
    assert cli.main(args) == 2 and "exists; resume it" in capsys.readouterr().err
    assert cli.main(args + ["--resume"]) == 0  # nothing left to do
    assert tree_digest(out) == finished
    atlas = EigenAtlas(out)
    assert atlas.layer_tensors(1, "eigenvalues").shape == (40, 2)
