"""Start-up time of ``bilinear-lens --version``: lazy package (today) against eager imports.

    python -m benchmarks.cli_start [--repeats 5]

Each measurement is a fresh interpreter (wall clock, median over ``--repeats``):

- ``eager``: what ``--version`` cost before the package became lazy: importing every public
  name (``bilinear_lens.__all__``, i.e. torch, TransformerLens and every subpackage) and then
  running the CLI's ``--version``;
- ``lazy``: ``python -m bilinear_lens --version`` as it is now (only ``bilinear_lens`` and
  ``bilinear_lens.cli`` are imported; torch is not).

Prints both medians and their ratio; the goal (issue #22 item 7) is ``lazy`` under 1.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]

EAGER = (
    "import bilinear_lens, sys\n"
    "for name in bilinear_lens.__all__: getattr(bilinear_lens, name)\n"
    "from bilinear_lens.cli import main\n"
    "sys.exit(main(['--version']))\n"
)
LAZY = "import runpy; runpy.run_module('bilinear_lens', run_name='__main__')"


def _seconds(code: str, args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def measure(repeats: int) -> dict[str, float]:
    """Median wall seconds of the eager and the lazy start (``repeats`` fresh interpreters each)."""
    eager = [_seconds(EAGER, []) for _ in range(repeats)]
    lazy = [_seconds(LAZY + "\n", ["--version"]) for _ in range(repeats)]
    return {"eager": statistics.median(eager), "lazy": statistics.median(lazy)}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per variant (median)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    times = measure(args.repeats)
    print(f"eager imports + --version: {times['eager']:.3f} s (median of {args.repeats})")
    print(f"lazy  --version:           {times['lazy']:.3f} s (median of {args.repeats})")
    print(f"ratio (eager/lazy):        {times['eager'] / times['lazy']:.1f}x")
    print(f"goal < 1.5 s:              {'met' if times['lazy'] < 1.5 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
