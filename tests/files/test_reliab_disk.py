"""Issue 24.2: a full, too-small or read-only disk under ``train``, the atlas and ``convert``
is one line naming the path and the cause, exit 1, no temporaries left, earlier data intact.

Two ways: writers patched to raise the real errors (safetensors' ``SafetensorError`` text
with ``os error 28/27``, ``OSError(errno.EROFS)``), and, where root may mount one, a real
small tmpfs (full, then remounted read-only)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from safetensors import SafetensorError

from bilinear_lens import cli
from bilinear_lens.disk_errors import DiskWriteError, disk_write_error
from bilinear_lens.models import loading as loading_module  # save_model writes the directory
from bilinear_lens.files.serialized import write_tensors
from bilinear_lens.models.model import build_model
from bilinear_lens.training.run_dir import checkpoint_path
from conftest import tiny_config
from conftest import run_config

# What safetensors raises on a full disk and on a file over the size limit (its Rust IO error).
ENOSPC_TEXT = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
EFBIG_TEXT = "Error while serializing: I/O error: File too large (os error 27)"


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


def failing_save_file(text: str):
    def save_file(*args, **kwargs):
        raise SafetensorError(text)
    return save_file


def test_disk_write_error_reads_oserror_and_safetensors_text(tmp_path) -> None:
    err = disk_write_error(SafetensorError(ENOSPC_TEXT), tmp_path / "out", "run directory")
    assert isinstance(err, DiskWriteError) and err.errno == errno.ENOSPC
    assert str(err).startswith(f"cannot write run directory {tmp_path / 'out'}: no space left on device (ENOSPC, errno 28)")
    err = disk_write_error(OSError(errno.EROFS, "Read-only file system", str(tmp_path / "out" / "x")), tmp_path / "out")
    assert f"(at {tmp_path / 'out' / 'x'}): read-only file system (EROFS, errno 30)" in str(err)
    assert disk_write_error(SafetensorError(EFBIG_TEXT), tmp_path).errno == errno.EFBIG
    assert disk_write_error(FileNotFoundError(errno.ENOENT, "gone"), tmp_path) is None  # not a disk error
    assert disk_write_error(ValueError("no os error here"), tmp_path) is None


def test_full_disk_mid_training_is_one_line_and_keeps_the_checkpoint(cache_dir, tmp_path, capsys, monkeypatch) -> None:
    recipe, out = tmp_path / "recipe.toml", tmp_path / "run"
    run_config(cache_dir, steps=6, eval_every=0, checkpoint_every=0).save_toml(recipe)
    args = ["train", "--config", str(recipe), "--out", str(out), "--no-progress", "--quiet"]
    assert cli.main([*args, "--stop-at", "2"]) == 0
    capsys.readouterr()
    kept = tree_digest(checkpoint_path(out, 2))
    monkeypatch.setitem(write_tensors.__globals__, "save_file", failing_save_file(ENOSPC_TEXT))
    assert cli.main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bilinear-lens train: error: ")
    assert f"cannot write run directory {out}: no space left on device (ENOSPC, errno 28)" in err
    assert leftovers(out) == [] and tree_digest(checkpoint_path(out, 2)) == kept
    monkeypatch.undo()
    assert cli.main([*args, "--resume"]) == 0  # space again: the run finishes from its checkpoint


def test_read_only_export_and_too_large_atlas_shard(tmp_path, capsys, monkeypatch) -> None:
    src, out = tmp_path / "m", tmp_path / "export"
    build_model(tiny_config(d_vocab=40)).save_pretrained(src)
    assert cli.main(["convert", str(src), "--out", str(out)]) == 0
    capsys.readouterr()
    before = tree_digest(out)

    def read_only(directory, *args):
        raise OSError(errno.EROFS, "Read-only file system", str(directory / "config.json"))

    monkeypatch.setattr(loading_module, "write_model_dir", read_only)
    assert cli.main(["convert", str(src), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write model directory (--out) {out} (at " in err
    assert "read-only file system (EROFS, errno 30)" in err
    assert tree_digest(out) == before and leftovers(tmp_path) == []
    monkeypatch.undo()

    atlas = tmp_path / "atlas"
    monkeypatch.setitem(write_tensors.__globals__, "save_file", failing_save_file(EFBIG_TEXT))
    assert cli.main(["eigen", "--checkpoint", str(src), "--all-tokens", "--top", "2", "--quiet", "--device", "cpu",
                     "--out", str(atlas)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write atlas dir {atlas}: file too large for the file system (EFBIG, errno 27)" in err
    assert leftovers(atlas) == [] and sorted(p.name for p in atlas.iterdir()) == ["index.json"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 160 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_real_full_then_read_only_tmpfs(small_tmpfs, tmp_path, capsys) -> None:
    src = tmp_path / "m"
    build_model(tiny_config(d_vocab=1200)).save_pretrained(src)  # ~390 KB of weights: over 160 KiB
    assert cli.main(["convert", str(src), "--out", str(small_tmpfs / "export")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no space left on device (ENOSPC, errno 28)" in err
    assert sorted(os.listdir(small_tmpfs)) == []  # the partial export and the lock are gone

    atlas = small_tmpfs / "atlas"  # k=8 of 1200 tokens x d 32: ~1.2 MB per layer
    assert cli.main(["eigen", "--checkpoint", str(src), "--all-tokens", "--quiet", "--device", "cpu",
                     "--layer", "0", "--out", str(atlas)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write atlas dir {atlas}" in err and "(ENOSPC, errno 28)" in err
    assert leftovers(small_tmpfs) == []
    written = tree_digest(small_tmpfs)

    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    assert cli.main(["convert", str(src), "--out", str(small_tmpfs / "export")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "read-only file system (EROFS, errno 30)" in err
    assert cli.main(["eigen", "--checkpoint", str(src), "--all-tokens", "--quiet", "--device", "cpu",
                     "--layer", "0", "--out", str(atlas), "--resume"]) == 1
    assert "read-only file system (EROFS, errno 30)" in capsys.readouterr().err
    assert tree_digest(small_tmpfs) == written  # nothing that was there changed
