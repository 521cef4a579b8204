"""The package's architecture holds (docs/architecture.md): layers, sizes, references.

`lint-imports` checks the import contracts of pyproject.toml; the mutation test shows it
fails when a forbidden import is added. The rest are the size and reference rules that a
linter does not check.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "silotune"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=cwd,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_import_contracts_hold() -> None:
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "forbidden", "contract"), [
    ("client/app.py", "silotune.server.loop", "imports neither the coordinator"),
    ("server/loop.py", "silotune.client.training", "imports neither silo code"),
    ("strategies/flora.py", "torch", "pure NumPy"),
    ("config.py", "silotune.ml.precision", "Layers"),
])
def test_a_forbidden_import_breaks_the_contracts(tmp_path: Path, module: str, forbidden: str,
                                                 contract: str) -> None:
    shutil.copytree(PACKAGE, tmp_path / "silotune",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "silotune" / module
    target.write_text(target.read_text() + f"\nimport {forbidden}  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(contract in line for line in broken), result.stdout


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long


def test_no_function_over_60_lines_in_the_coordinator_and_the_silo() -> None:
    long = []
    for path in _modules():
        if path.parent.name not in ("server", "client"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({size} lines)")
    assert not long


OUTSIDE = re.compile(r"notes/\w+\.md|DESIGN\.md|shared/notes|\.\./shared")


def test_no_reference_to_a_file_outside_the_repository() -> None:
    files = [*_modules(), *(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py"),
             *(ROOT / "docs").glob("*.md"), ROOT / "README.md", ROOT / "pyproject.toml",
             *(ROOT / "deploy").rglob("*"), *(ROOT / "scripts").glob("*")]
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files if p.is_file()
            for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
            if OUTSIDE.search(line) and p != Path(__file__)]
    assert not hits


def test_no_test_imports_a_private_name_of_another_module() -> None:
    private = []
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("silotune"):
                private += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                            for a in node.names if a.name.startswith("_")]
    assert not private
