"""The package's import structure: the CLI starts without torch (issue #22 item 7)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    ).stdout
    return set(out.split())


def test_cli_help_and_version_do_not_import_torch():
    for flag in ("--help", "--version"):
        loaded = _modules_after(
            f"import contextlib, io\nfrom bilinear_lens.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()): main([{flag!r}])"
        )
        assert "torch" not in loaded and "transformer_lens" not in loaded, flag


def test_public_names_are_lazy_and_resolve_through_one_table():
    import bilinear_lens

    assert "torch" not in _modules_after("import bilinear_lens")
    assert set(bilinear_lens.__all__) == set(bilinear_lens._PUBLIC)
    assert set(bilinear_lens.__all__) <= set(dir(bilinear_lens))
    from bilinear_lens import ModelConfig  # the from-import form goes through __getattr__ too

    assert ModelConfig.__module__ == bilinear_lens._PUBLIC["ModelConfig"]
