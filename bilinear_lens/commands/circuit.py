"""``bilinear-lens circuit SUBCOMMAND``: circuits across the whole model.

Each subcommand lives in ``bilinear_lens/commands/circuit_<name>.py`` with
``build_parser()`` and ``main(argv) -> int``; this module only dispatches (lazily, as
``cli`` does). Exit status as every command: 0 success, 2 usage/input error, 1 failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType
from typing import Optional

SUBCOMMANDS = {
    "patch": "batched activation-patching grids (layer x position, heads, eigen-components)",
    "attribute": "attribution patching (atp, two_point, gauss_legendre, exact) with exactness diagnostics",
    "pairs": "exact pair decomposition of a bilinear MLP's output over residual writers",
    "graph": "attribution graph without transcoders (exact direct effects, pruned), HTML or JSON",
}


def _usage() -> str:
    lines = ["usage: bilinear-lens circuit SUBCOMMAND [options]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, help_ in SUBCOMMANDS.items()]
    lines += ["", "run `bilinear-lens circuit SUBCOMMAND --help` for its options"]
    return "\n".join(lines)


def _subcommand_module(name: str) -> Optional[ModuleType]:
    """``bilinear_lens.commands.circuit_<name>``, or ``None`` when this version lacks it."""
    try:
        return importlib.import_module(f"bilinear_lens.commands.circuit_{name}")
    except ModuleNotFoundError as err:
        if err.name == f"bilinear_lens.commands.circuit_{name}":
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    """The whole ``circuit`` command as one parser, every subcommand's options under its
    name (for help and for tests that walk every option; :func:`main` dispatches lazily)."""
    parser = argparse.ArgumentParser(prog="bilinear-lens circuit", description=__doc__.split("\n\n")[0])
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    for name, help_ in SUBCOMMANDS.items():
        module = _subcommand_module(name)
        if module is not None:
            subparsers.add_parser(name, parents=[module.build_parser()], add_help=False, help=help_,
                                  description=help_)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"bilinear-lens circuit: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = _subcommand_module(name)
    if module is None:
        print(f"bilinear-lens circuit: subcommand {name!r} is not available in this version", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)
