"""`silotune simulate --mode crosslm` end to end on tiny models (Flower Simulation Engine).

Two silos, one round: the metrics contract, the saved synthetic set, and ledgers with a
train entry per SLM training and a 0-epsilon feedback entry per score release that
`silotune audit` accepts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_crosslm_run_writes_metrics_synthetic_data_and_auditable_ledgers(
        tiny_model_dir, tiny_encoder_dir, toy_dataset_file, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "silotune.cli", "simulate", "--mode", "crosslm",
         "--model", str(tiny_model_dir), "--slm", str(tiny_encoder_dir),
         "--dataset", str(toy_dataset_file), "--silos", "2", "--rounds", "1",
         "--per-label", "3", "--threshold", "0", "--slm-steps", "3", "--llm-steps", "2",
         "--max-new-tokens", "6", "--batch-size", "16", "--test-size", "30",
         "--epsilon", "8", "--out", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "crosslm" and metrics["private"] is True
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    last = metrics["rounds"][1]
    assert set(last["slm_accuracy"]) == {"silo-000", "silo-001"}
    assert last["slm_accuracy_mean"] == pytest.approx(
        sum(last["slm_accuracy"].values()) / 2)
    assert 0 < last["synthetic_size"] <= 9 and last["synthetic_kept"] == last["synthetic_size"]
    assert 0.0 <= last["mean_score"] <= 1.0 and last["perplexity"] > 1.0
    assert 0.0 <= last["accuracy"] <= 1.0 and last["excluded"] == []
    lines = [json.loads(x) for x in (out / "synthetic.jsonl").read_text().splitlines()]
    assert len(lines) == last["synthetic_size"]
    assert {"round", "text", "label", "score", "kept"} == set(lines[0])
    ledgers = sorted((out / "ledgers").glob("*.jsonl"))
    assert len(ledgers) == 2
    for ledger in ledgers:
        kinds = [json.loads(x)["type"] for x in ledger.read_text().splitlines()]
        assert kinds == ["train", "feedback", "train"]
    audit = subprocess.run([sys.executable, "-m", "silotune.cli", "audit",
                            *map(str, ledgers)], env=env, capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "SLM accuracy" in proc.stdout and "LLM acc" in proc.stdout
