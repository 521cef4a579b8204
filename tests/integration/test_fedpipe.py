"""FedPipe end to end on the tiny model: importance query, per-silo plan, partial
weights through the real Flower Simulation Engine, peak memory recorded per silo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_simulation_with_profiles_follows_the_plan(tiny_model_dir, toy_dataset_file,
                                                   tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAY_DEDUP_LOGS": "0"}
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "silotune.cli", "simulate", "--model", str(tiny_model_dir),
         "--dataset", str(toy_dataset_file), "--silos", "2", "--rounds", "1",
         "--local-steps", "2", "--test-size", "30", "--epsilon", "8",
         "--profiles", "hospital-mix", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "[plan] FedPipe configuration" in proc.stdout and "binding" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    plan = metrics["plan"]
    assert set(plan["importance"]) == {"q_proj", "k_proj", "v_proj", "o_proj",
                                       "gate_proj", "up_proj", "down_proj"}
    assert [plan["silos"][s]["profile"] for s in ("silo-000", "silo-001")] == \
        ["research-hospital", "regional-hospital"]
    row = metrics["rounds"][0]
    assert row["participants"] == ["silo-000", "silo-001"] and row["excluded"] == []
    for silo, planned in plan["silos"].items():
        assert row["ranks"][silo] == planned["rank"]
        peak = row["peak_memory_bytes"][silo]
        assert 0 < peak <= planned["memory_limit_bytes"]
