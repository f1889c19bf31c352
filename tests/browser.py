"""Headless Chromium helpers for tests that check pages render (offline, no sandbox).

Chromium's own console log cannot tell errors from other messages, so pages get
:data:`ERROR_RECORDER` at the top of ``<head>``: it records uncaught errors, promise
rejections and ``console.error`` into ``<html data-js-errors=...>``, read from the DOM.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


ERROR_RECORDER = """<script>
window.__errors = [];
function __rec(m) { __errors.push(String(m)); document.documentElement.setAttribute("data-js-errors", JSON.stringify(__errors)); }
const __ce = console.error; console.error = (...a) => { __rec(a.join(" ")); __ce(...a); };
window.addEventListener("error", e => __rec(e.message));
window.addEventListener("unhandledrejection", e => __rec(e.reason));
</script>"""


def dump_dom(page: str, tmp: Path) -> str:
    """The DOM of ``page`` after its scripts ran, from headless Chromium (offline, sandboxless)."""
    path = tmp / "page.html"
    path.write_text(page, encoding="utf-8")
    profile = tempfile.mkdtemp(dir=tmp)
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--virtual-time-budget=5000", "--dump-dom", path.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def screenshot(page_path: Path, out_png: Path, width: int = 1200, height: int = 2400) -> None:
    """A PNG screenshot of a page file, by headless Chromium."""
    profile = tempfile.mkdtemp(dir=out_png.parent)
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
        "--virtual-time-budget=5000", f"--window-size={width},{height}", f"--screenshot={out_png}", page_path.as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and out_png.is_file(), done.stderr[-2000:]
