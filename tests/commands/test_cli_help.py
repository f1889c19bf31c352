"""The command line's help: every option of every (sub)command explains itself, and
``bilinear-lens --version`` names the installed version."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import subprocess
import sys

import pytest

from bilinear_lens import cli


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """``(name, parser)`` for every command and, recursively, every sub-command."""
    found = []

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(f"{name} {sub_name}", sub)

    for command in cli.COMMANDS:
        walk(command, importlib.import_module(f"bilinear_lens.commands.{command}").build_parser())
    return found


def test_every_command_is_walked() -> None:
    names = [name for name, _ in parsers()]
    assert set(cli.COMMANDS) <= set(names) and "sae train" in names


@pytest.mark.parametrize("name, parser", parsers(), ids=[name for name, _ in parsers()])
def test_every_option_has_help(name: str, parser: argparse.ArgumentParser) -> None:
    missing = [action.option_strings or [action.dest] for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction)
               and (not action.help or action.help == argparse.SUPPRESS)]
    assert not missing, f"bilinear-lens {name}: options without help: {missing}"
    assert parser.format_help()  # every help string formats (no stray % in them)


def test_version_is_the_installed_package_version(capsys) -> None:
    expected = importlib.metadata.version("bilinear-lens")
    for flag in ("--version", "-V"):
        assert cli.main([flag]) == 0
        assert capsys.readouterr().out == f"bilinear-lens {expected}\n"
    assert cli.main(["--help"]) == 0
    assert "--version" in capsys.readouterr().out


def test_version_from_the_console_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "bilinear_lens", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["bilinear-lens", importlib.metadata.version("bilinear-lens")]


def test_unknown_command_is_a_usage_error(capsys) -> None:
    assert cli.main(["eigenn"]) == 2
    assert "unknown command 'eigenn'" in capsys.readouterr().err
