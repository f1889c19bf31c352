"""The test suite's own layout (issue #22 item 8): tests mirror the package, share helpers
through ``conftest.py`` and ``tests/fixtures/``, and train tokenizers only there.

- A test module lives in ``tests/<subpackage>/`` for the ``bilinear_lens`` subpackage it
  tests, or at the top level when it tests a top-level module (``test_<module>.py``) or
  is one of the cross-cutting modules listed in ``CROSS_CUTTING``.
- No test module imports another test module (a helper two modules need moves to
  ``tests/fixtures/``), and none imports ``tests.conftest``: that would load conftest a
  second time under another name (two copies of its module state); ``conftest`` is the name.
- ``train_tokenizer(`` is called only in conftest, ``tests/fixtures/`` and the tests of the
  tokenizer itself; every other test takes a session fixture (``small_tokenizer``,
  ``story_tokenizer``, ``saved_checkpoint``), so a suite run trains each size once.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "bilinear_lens"
FIXTURES = TESTS / "fixtures"

CROSS_CUTTING = {
    "test_analysis.py": "the analysis/ scripts at the repository root",
    "test_benchmarks.py": "the benchmarks/ scripts at the repository root",
    "test_import_layers.py": "the import structure of the whole package",
    "test_notebooks.py": "the notebooks, which use every subpackage",
    "test_package.py": "the public API re-exported by bilinear_lens/__init__.py",
    "test_test_layout.py": "this file: the layout of tests/",
}
# Non-test helper modules at the top level of tests/ (besides conftest.py).
TOP_LEVEL_HELPERS = {"browser.py", "images_fixtures.py"}
TRAINS_TOKENIZERS = {TESTS / "data" / "test_tokenizer.py", TESTS / "data" / "test_data.py"}


def _subpackages() -> set[str]:
    return {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def _top_level_modules() -> set[str]:
    return {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return str(path.relative_to(TESTS))


def test_every_test_module_is_in_the_directory_of_what_it_tests():
    subpackages, modules = _subpackages(), _top_level_modules()
    misplaced = []
    for path in _python_files():
        rel = path.relative_to(TESTS)
        if path.name == "conftest.py" and rel.parent == Path("."):
            continue
        if rel.parts[0] == "fixtures":
            if path.name.startswith("test_"):
                misplaced.append(f"{rel}: tests/fixtures/ holds helpers, not test modules")
            continue
        if len(rel.parts) == 1:
            ok = (path.name in CROSS_CUTTING or path.name in TOP_LEVEL_HELPERS
                  or (path.name.startswith("test_") and path.stem[len("test_"):] in modules))
            if not ok:
                misplaced.append(f"{rel}: not a top-level module's test, not in CROSS_CUTTING or TOP_LEVEL_HELPERS")
        elif len(rel.parts) != 2 or rel.parts[0] not in subpackages:
            misplaced.append(f"{rel}: {rel.parent} is not a bilinear_lens subpackage ({', '.join(sorted(subpackages))})")
        elif not path.name.startswith("test_"):
            misplaced.append(f"{rel}: a helper module belongs in tests/fixtures/")
    assert misplaced == []
    assert len(list(TESTS.glob("*/test_*.py"))) > 50  # the walk found the suite


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def test_no_test_module_imports_another_test_module():
    bad = [f"{_rel(path)} imports {name}" for path in _python_files() for name in _imported_modules(path)
           if any(part.startswith("test_") for part in name.split(".")) or name.split(".")[0] == "tests"]
    assert bad == []


def _calls(path: Path, function: str) -> list[int]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
            and (getattr(node.func, "id", None) == function or getattr(node.func, "attr", None) == function)]


def test_tokenizers_are_trained_only_in_fixtures_and_the_tokenizer_tests():
    allowed = {TESTS / "conftest.py", *FIXTURES.glob("*.py"), *TRAINS_TOKENIZERS}
    calls = {path: _calls(path, "train_tokenizer") for path in _python_files()}
    stray = [f"{_rel(path)}:{line}" for path, lines in calls.items() if path not in allowed for line in lines]
    assert stray == []
    assert calls[FIXTURES / "tokenizers.py"]  # the check sees the one place that trains them
