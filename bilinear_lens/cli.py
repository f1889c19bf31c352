"""``bilinear-lens`` command line: ``bilinear-lens COMMAND [options]``.

Each command lives in ``bilinear_lens/commands/<name>.py`` with ``build_parser()`` and
``main(argv) -> int``; this module only dispatches (and imports lazily, so ``--help``
and ``--version`` are fast). Exit status, every command alike: 0 on success, 2 for a usage,
configuration or input error (argparse's convention, also for an unknown command), 1 when
the work itself fails.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from typing import Optional

DISTRIBUTION = "bilinear-lens"  # the installed package whose version --version prints

COMMANDS = {
    "train": "train a model from a TOML recipe",
    "eigen": "eigendecompose a bilinear layer's interaction matrix for a token/direction",
    "ablate": "neuron ablation sweep of an MLP layer",
    "polytope": "polytope-region statistics of an MLP layer over a text file",
    "report": "self-contained HTML report of a checkpoint",
    "convert": "convert models: the paper's checkpoints, HF Llama format, hub ids",
    "sae": "train sparse autoencoders (SAELens format) on a checkpoint's activations",
    "circuit": "circuits: patching grids, attribution patching, MLP pair terms, attribution graphs",
}


def _usage() -> str:
    lines = ["usage: bilinear-lens [--version] COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, help_ in COMMANDS.items()]
    lines += ["", "run `bilinear-lens COMMAND --help` for a command's options"]
    return "\n".join(lines)


def version() -> str:
    """The installed package's version (``importlib.metadata``), or ``unknown`` when the
    package is not installed (e.g. run from a source tree on ``PYTHONPATH``)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # no command: usage on stderr and 2, as argparse does for a missing argument
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"{DISTRIBUTION} {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bilinear-lens: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"bilinear_lens.commands.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"bilinear_lens.commands.{name}":
            print(f"bilinear-lens: command {name!r} is not available in this version", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
