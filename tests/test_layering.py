"""The import direction of the packages: schemas <- shards <- annotators <- pipelines, model <- {schemas, shards}.

Every import is checked, module level and inside functions (lazy imports still couple the packages).
The root CLI reaches `model`'s commands by name (`pipelines.cli.COMMAND_MODULES`), not by import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "shards", "annotators", "pipelines", "model")
ALLOWED = {
    "schemas": {"schemas"},
    "shards": {"schemas", "shards"},
    "annotators": {"schemas", "shards", "annotators"},
    "pipelines": {"schemas", "shards", "annotators", "pipelines"},
    "model": {"schemas", "shards", "model"},
}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_follow_the_layering(package: str) -> None:
    wrong = {}
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for f in files:
        bad = _imports(f) - ALLOWED[package]
        if bad:
            wrong[str(f.relative_to(ROOT))] = sorted(bad)
    assert wrong == {}, f"{package} imports against the direction: {wrong}"


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from pipelines.engine import run\n    import model.data\n")
    assert _imports(f) == {"pipelines", "model"}


def test_no_module_over_600_lines() -> None:
    big = {str(f.relative_to(ROOT)): n for p in PACKAGES for f in (ROOT / p).rglob("*.py")
           if (n := len(f.read_text().splitlines())) >= 600}
    assert big == {}, f"modules of 600 lines or more: {big}"
