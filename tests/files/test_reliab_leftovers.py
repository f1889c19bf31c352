"""Issue 24.7: crash leftovers. Dead atlas writers' ``.layerNN-*.tmp-PID-*`` directories are
removed at the next start (a live writer's are kept); a ``convert`` killed between the two
renames of a replace is finished (or undone) at the next start, so ``--out`` is never left
missing with only hidden copies. Kills are real ``SIGKILL`` s of a second process."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bilinear_lens import cli
from bilinear_lens.models.model import BilinearTransformer, build_model
from bilinear_lens.output_locks import finish_interrupted_replace
from bilinear_lens.weights.atlas import model_atlas
from conftest import tiny_config

REPO = Path(__file__).resolve().parents[2]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def content_digest(root: Path) -> dict[str, object]:
    from benchmarks.fault_injection_outputs import content_digest as digest

    return digest(root)


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_dead_atlas_writers_temporaries_are_removed_live_ones_kept(tmp_path) -> None:
    model = build_model(tiny_config(d_vocab=40))
    options = dict(tokens=list(range(12)), layers=[0], k=2, shard_size=4, progress=False)
    model_atlas(model, tmp_path / "ref", **options)
    out = tmp_path / "a"
    model_atlas(model, out, **options)
    dead, live = dead_pid(), os.getppid()
    for name in (f".layer00-0000004.tmp-{dead}-x1y2", f".layer00-0000008.tmp-{live}-a1b2"):
        (out / name).mkdir()
        (out / name / "eigen.safetensors").write_bytes(b"partial")
    (out / f".index.json.tmp-{dead}").write_text("{")
    model_atlas(model, out, resume=True, **options)
    assert hidden(out) == [f".layer00-0000008.tmp-{live}-a1b2"]  # a live pid's work in progress stays
    (out / f".layer00-0000008.tmp-{live}-a1b2" / "eigen.safetensors").unlink()
    (out / f".layer00-0000008.tmp-{live}-a1b2").rmdir()
    assert tree_digest(out) == tree_digest(tmp_path / "ref")


def plant_replace(tmp_path: Path, with_new: bool) -> tuple[Path, int]:
    """``out`` as a replace killed between its renames leaves it: missing, the old export
    at ``.out.old-PID`` and (``with_new``) the finished new one at ``.out.tmp-PID-*``."""
    out, pid = tmp_path / "out", dead_pid()
    build_model(tiny_config(d_vocab=40, seed=1)).save_pretrained(tmp_path / f".out.old-{pid}")
    if with_new:
        build_model(tiny_config(d_vocab=40, seed=2)).save_pretrained(tmp_path / f".out.tmp-{pid}-k3j4")
    return out, pid


def test_interrupted_replace_is_finished_or_restored(tmp_path) -> None:
    new_seed = tiny_config(d_vocab=40, seed=2)
    (tmp_path / "finish").mkdir()
    out, pid = plant_replace(tmp_path / "finish", with_new=True)
    expected = tree_digest(tmp_path / "finish" / f".out.tmp-{pid}-k3j4")
    done = finish_interrupted_replace(out)
    assert done[0] == f"finished pid {pid}'s interrupted replace of {out} (moved .out.tmp-{pid}-k3j4 into place)"
    assert tree_digest(out) == expected and hidden(out.parent) == []
    assert BilinearTransformer.from_pretrained(out).cfg.seed == new_seed.seed

    (tmp_path / "restore").mkdir()
    out, pid = plant_replace(tmp_path / "restore", with_new=False)
    expected = tree_digest(tmp_path / "restore" / f".out.old-{pid}")
    assert finish_interrupted_replace(out) == [f"restored {out} from pid {pid}'s .out.old-{pid}"]
    assert tree_digest(out) == expected and hidden(out.parent) == []

    # out present (killed while deleting .old): the leftovers of dead pids only are removed
    live = tmp_path / "restore" / f".out.old-{os.getppid()}"
    live.mkdir()
    (tmp_path / "restore" / f".out.old-{dead_pid()}").mkdir()
    finish_interrupted_replace(out)
    assert hidden(out.parent) == [live.name] and tree_digest(out) == expected


# A convert over an existing export, SIGKILLed right after renaming the old export aside.
KILLED_CONVERT = """
    import os, signal, sys
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if ".old-" in os.fspath(dst):  # the first of the two renames
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
    from bilinear_lens import cli
    cli.main(["convert", sys.argv[1], "--out", sys.argv[2]])
"""


@pytest.mark.slow  # a second process imports torch and the package (~15-30 s on 2 busy cores)
def test_convert_killed_between_renames_is_finished_at_the_next_start(tmp_path, capsys) -> None:
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "out"
    build_model(tiny_config(d_vocab=40, seed=1)).save_pretrained(first)
    build_model(tiny_config(d_vocab=40, seed=2)).save_pretrained(second)
    assert cli.main(["convert", str(first), "--out", str(out)]) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_CONVERT), str(second), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists() and len(hidden(tmp_path)) == 2  # the state: only hidden copies
    assert cli.main(["convert", str(second), "--out", str(out)]) == 0
    assert hidden(tmp_path) == []
    # same files; model.safetensors' header compared parsed: safetensors orders metadata keys
    # at random (a Rust HashMap), so only the header's byte order may differ between saves
    assert content_digest(out) == content_digest(second)
