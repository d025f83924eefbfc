"""The architecture contract: layers import downwards only (import-linter, lazy imports included), every module
sits in a layer, and functions stay short enough to read."""

import ast
import pkgutil
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmlab_cli", "data_prep")
MAX_FUNCTION_LINES = 60
LONG_BY_DESIGN = {"mmlab_cli/engine/fit.py::_train"}  # the training loop, read top to bottom


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_the_import_contracts_hold(monkeypatch):
    """An import from a lower layer to a higher one, or a cycle between layers, fails here with import-linter's
    report naming the import chain."""
    pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_every_module_sits_in_a_layer():
    """A new top-level module left out of the layers would escape the contract."""
    layers = next(c for c in _contracts() if c["type"] == "layers")["layers"]
    named = {part.strip() for layer in layers for part in layer.split("|")}
    top = {f"mmlab_cli.{m.name}" for m in pkgutil.iter_modules([str(ROOT / "mmlab_cli")])} - {"mmlab_cli.__main__"}
    assert sorted(top - named) == []
    assert "data_prep" in named


def _long_functions() -> list[str]:
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{path.relative_to(ROOT)}::{node.name}"
                    if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES and name not in LONG_BY_DESIGN:
                        found.append(f"{name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


def test_no_function_is_longer_than_a_screen():
    assert _long_functions() == []
