"""The public API: every advertised name resolves; the console script is installed."""

import shutil
import subprocess
import sys

import bilinear_lens


def test_every_public_name_resolves():
    for name in bilinear_lens.__all__:
        assert getattr(bilinear_lens, name) is not None, name


def test_console_script_help():
    exe = shutil.which("bilinear-lens")
    cmd = [exe] if exe else [sys.executable, "-m", "bilinear_lens"]
    done = subprocess.run(cmd + ["--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for command in ("train", "eigen", "ablate", "polytope", "report"):
        assert command in done.stdout
    bad = subprocess.run(cmd + ["frobnicate"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr
