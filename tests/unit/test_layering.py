"""The layout a newcomer relies on: imports point down the data flow (no module imports from a
stage that comes after its own), and long modules say why they are one unit.

config -> data -> model -> prune -> train -> export -> tune -> serving -> cli, with the shared
helpers (``errors``, ``files``, ``raycluster``, ``cpu``) at the bottom. Read from the source (AST), so a
lazy import inside a function counts as much as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "bloomray"

# Stage of each top-level module or subpackage of bloomray; a module may import its own
# stage and the ones below it.
STAGES = {
    "errors": 0,
    "files": 0,
    "raycluster": 0,
    "cpu": 0,
    "config": 1,
    "data": 2,
    "model": 3,
    "prune": 4,
    "train": 5,
    "export": 6,
    "tune": 7,
    "serving": 8,
    "demo": 9,
    "cli": 9,
}


def _stage_of(module: str) -> int:
    """Stage of a dotted ``bloomray.x.y`` name (``bloomray`` itself: the bottom)."""
    parts = module.split(".")
    return STAGES[parts[1]] if len(parts) > 1 else 0


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``bloomray`` import in ``path``, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "bloomray" or n.startswith("bloomray.")]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_stage():
    tops = {_module_name(p).split(".")[1] for p in SOURCES if _module_name(p) != "bloomray"}
    assert tops <= set(STAGES), f"give these a stage in STAGES: {sorted(tops - set(STAGES))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down_the_flow(path: Path):
    own = _stage_of(_module_name(path)) if _module_name(path) != "bloomray" else 0
    upward = [f"line {line}: {mod}" for line, mod in _imports(path) if _stage_of(mod) > own]
    assert not upward, f"{path.relative_to(PACKAGE)} imports from later stages: {upward}"


def test_the_check_sees_lazy_imports(tmp_path: Path):
    """The check would catch a function-level import (the usual way a cycle sneaks in)."""
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from bloomray.export.load import load_model\n")
    assert _imports(src) == [(2, "bloomray.export.load")]


# A module past this many lines says why in its docstring ("Longer than ...").
MAX_LINES = 320


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_long_modules_say_why(path: Path):
    text = path.read_text()
    lines = text.count("\n")
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert lines <= MAX_LINES or "Longer than" in doc, (
        f"{path.relative_to(PACKAGE)} has {lines} lines: split it by responsibility, "
        "or say in its docstring why it is one unit ('Longer than ...: <reason>')"
    )
