"""Every script under benchmarks/ still runs: a stale benchmark fails CI, not its next user.

Three levels, cheapest first: every script answers ``--help`` (its top-level imports
resolve and its parser builds); every ``from silotune... import name`` in a script, also
those inside functions that ``--help`` never reaches, names something that exists; and
the scripts whose main path fits a unit test run it on the tiny model and toy task.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def _run(*argv: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **OFFLINE,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_there_are_benchmarks():
    assert len(BENCHMARKS) >= 7, BENCHMARKS


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_help(script: Path):
    proc = _run(script, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"usage: {script.name}"), proc.stdout[:500]


def _project_imports(script: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) for every absolute import of silotune/tests."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(script.read_text(), filename=str(script))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in ("silotune", "tests"):
                found += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names
                      if a.name.split(".")[0] in ("silotune", "tests")]
    return found


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_project_imports_resolve(script: Path, monkeypatch):
    """Includes the imports inside functions, which only a full run would execute."""
    monkeypatch.syspath_prepend(str(ROOT))
    missing = []
    for line, module, name in _project_imports(script):
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            missing.append(f"{script.name}:{line}: {module}: {err}")
            continue
        if name is not None and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert missing == []


def test_privacy_audit_runs_on_the_tiny_model(tiny_model_dir, toy_dataset_file, tmp_path):
    out = tmp_path / "privacy_audit.json"
    proc = _run(ROOT / "benchmarks" / "privacy_audit.py", "--model", tiny_model_dir,
                "--dataset", toy_dataset_file, "--canaries", "50", "--steps", "2",
                "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, *rows = json.loads(out.read_text())
    assert header["canaries"] == 50 and header["steps"] == 2 and header["silo_examples"] > 0
    assert [r["control"] for r in rows] == ["noise off", "DP on", "never inserted"]
    assert rows[1]["eps_accounted"] is not None and rows[2]["inserted_canaries"] == 0


def test_fedpipe_memory_measures_one_configuration(tiny_model_dir, toy_dataset_file,
                                                   monkeypatch):
    """The per-configuration path (``--one``) on the tiny model instead of the default."""
    import torch

    from silotune.config import RunConfig

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import fedpipe_memory

    monkeypatch.setattr(fedpipe_memory, "RunConfig", lambda: RunConfig(
        model=str(tiny_model_dir), dataset=str(toy_dataset_file)))
    threads = torch.get_num_threads()
    try:
        row = fedpipe_memory.measure_one(("q_proj", "v_proj"), 2, 4, "fp32")
    finally:
        torch.set_num_threads(threads)  # measure_one pins this process to one thread
    assert row["rank"] == 2 and row["batch"] == 4 and row["seq_len"] > 0
    assert row["measured_mb"] >= 0


def test_aggregation_runs_on_a_small_grid(tmp_path):
    out = tmp_path / "aggregation.json"
    proc = _run(ROOT / "benchmarks" / "aggregation.py", "--silos", "3", "--models",
                "smollm2-135m", "--rules", "flora", "fedit", "ffa", "--repeats", "1",
                "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, *rows = json.loads(out.read_text())
    assert header["header"] is True
    assert sorted(r["strategy"] for r in rows) == ["fedit", "ffa", "flora"]
