"""The package's import structure (issue #22): layers, no circles, a CLI that starts
without torch.

Layers, lowest first (README's module map states the same order). A module may import
from its own layer and the layers below, never from a layer above; the check reads every
``import`` with ``ast``, at module level and inside functions alike:

    runtime      locking, distributed      (locks, torchrun ranks, the device rule)
    files        files/                    (names, atomic writes, JSON/safetensors)
    data         data/
    models       models/
    weights      weights/
    activations  activations/, toy
    training     training/
    sae          sae/                      (its trainer runs on training's Trainer)
    circuits     circuits/, views/
    commands     commands/
    cli          cli, __main__

No import circle exists, at module level or through a function-level import (the last,
``models.model`` <-> ``models.paper_checkpoints``, ended when the formats began returning
data to ``models.model``: issue #22 item 2).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bilinear_lens"
LAYERS = (
    ("locking", "distributed", "progress", "disk_errors", "field_errors"), ("files", "output_locks", "tensor_checksum"), ("data",), ("models",), ("weights",), ("activations", "toy"),
    ("training",), ("sae",), ("circuits", "views"), ("commands",), ("cli", "__main__"),
)
LAYER_OF = {top: rank for rank, tops in enumerate(LAYERS) for top in tops}


def _modules() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported bilinear_lens module, at module level?)`` for every import in ``path``;
    ``from package import module`` counts as importing that module."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("bilinear_lens"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.append((child if child in MODULES else node.module, top))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, top) for alias in node.names if alias.name.startswith("bilinear_lens"))
        inner = top and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        visit(node, True)
    return found


def _top(module: str) -> str:
    return module.split(".")[1]


def _circles(module_level_only: bool) -> list[set[str]]:
    """The strongly connected components (more than one module) of the import graph (Tarjan)."""
    graph = defaultdict(set)
    for module, path in MODULES.items():
        graph[module] |= {t for t, top in _imports(path) if t in MODULES and (top or not module_level_only)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(component)

    for module in sorted(MODULES):
        if module not in index:
            connect(module)
    return circles


def test_every_subpackage_has_a_layer():
    tops = {_top(m) for m in MODULES if m != "bilinear_lens"}
    assert tops <= set(LAYER_OF), sorted(tops - set(LAYER_OF))


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{module} -> {target}" for module, path in MODULES.items() if module != "bilinear_lens"
              for target, _ in _imports(path)
              if target != "bilinear_lens" and LAYER_OF[_top(module)] < LAYER_OF[_top(target)]]
    assert upward == []


def test_no_import_circles():
    assert _circles(module_level_only=True) == []
    assert _circles(module_level_only=False) == []


def test_the_graph_reader_sees_circles_and_layers(tmp_path, monkeypatch):
    """The checks above can fail: a planted circle and an upward import are found."""
    (tmp_path / "a.py").write_text("from bilinear_lens.commands import common\n")
    assert _imports(tmp_path / "a.py") == [("bilinear_lens.commands.common", True)]
    (tmp_path / "b.py").write_text("def f():\n    import bilinear_lens.cli\n")
    assert _imports(tmp_path / "b.py") == [("bilinear_lens.cli", False)]
    assert LAYER_OF[_top("bilinear_lens.files.x")] < LAYER_OF[_top("bilinear_lens.commands.common")]
    (tmp_path / "c.py").write_text("import bilinear_lens.files.atomic\n")
    monkeypatch.setitem(MODULES, "bilinear_lens.files.planted", tmp_path / "c.py")
    atomic = MODULES["bilinear_lens.files.atomic"]
    patched = atomic.read_text(encoding="utf-8") + "\nimport bilinear_lens.files.planted\n"
    (tmp_path / "atomic.py").write_text(patched)
    monkeypatch.setitem(MODULES, "bilinear_lens.files.atomic", tmp_path / "atomic.py")
    assert {"bilinear_lens.files.atomic", "bilinear_lens.files.planted"} in _circles(module_level_only=True)


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
