"""A 2-silo, 2-round federation through the real Flower Simulation Engine (Ray).

Tiny random Llama + toy dataset, DP-SGD on (and client-level DP on the coordinator);
checks the metrics.json contract, that each silo's reported epsilon equals an independent
recomputation from its ledger history, and that the ledgers verify. Client-level DP is
checked on the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from silotune.privacy.accounting import AccountingStep, compute_epsilon, compute_epsilon_rdp
from silotune.privacy.client_level import ClientLevelConfig, client_level_epsilon
from silotune.privacy.ledger import verify_ledger

pytestmark = pytest.mark.integration


def _silotune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAY_DEDUP_LOGS": "0"}
    return subprocess.run([sys.executable, "-m", "silotune.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def private_run(tiny_model_dir, toy_dataset_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    proc = _silotune("simulate", "--model", str(tiny_model_dir), "--dataset",
                     str(toy_dataset_file), "--silos", "2", "--rounds", "2",
                     "--local-steps", "3", "--batch-size", "16", "--ranks", "4,2",
                     "--lr", "0.01", "--test-size", "30", "--epsilon", "8",
                     "--client-dp-noise", "1.0", "--client-dp-clip", "0.5",  # client level too
                     "--out", str(out), cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, proc


def test_metrics_follow_the_contract(private_run):
    out, proc = private_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert isinstance(metrics["config"], dict) and metrics["private"] is True
    assert 0.0 <= metrics["base_accuracy"] <= 1.0
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for row in metrics["rounds"]:
        assert set(row) >= {"round", "accuracy", "loss", "epsilon", "bytes_up", "bytes_down",
                            "seconds", "excluded"}
        assert set(row["epsilon"]) == {"silo-000", "silo-001"}
        assert row["bytes_up"] > 0 and row["excluded"] == []
    down = [r["bytes_down"] for r in metrics["rounds"]]
    assert down[0] == 0 < down[1]  # silos regenerate seeded starts; round 2: round 1's update
    assert (out / "report.html").exists()
    assert "round 2/2" in proc.stdout


def test_redirected_output_is_plain_and_quiet(private_run):
    """A DP run into a file: no colour codes (Ray's worker prefixes, Flower's levels), no
    Opacus or transformers warnings, no Flower shutdown notices."""
    _, proc = private_run
    log = proc.stdout + proc.stderr
    assert "\x1b[" not in log
    for noise in ("RuntimeWarning", "divide by zero", "FutureWarning", "past_key_values",
                  "Manually terminating"):
        assert noise not in log, noise
    assert "[config] " in proc.stdout and "lora-targets=q_proj,v_proj" in proc.stdout


def test_reported_epsilon_matches_independent_recomputation(private_run):
    out, _ = private_run
    final = json.loads((out / "metrics.json").read_text())["rounds"][-1]["epsilon"]
    for silo, eps in final.items():
        ledger = out / "ledgers" / f"{silo}.jsonl"
        entries = [json.loads(line) for line in ledger.read_text().splitlines()]
        assert len(entries) == 2  # one signed entry per round
        history = [AccountingStep.from_dict(s) for s in entries[-1]["accounting_history"]]
        assert sum(s.steps for s in history) == 6  # 2 rounds x 3 local steps, cumulative
        assert eps == pytest.approx(compute_epsilon(history, 1e-5).epsilon, rel=1e-9)
        assert compute_epsilon_rdp(history, 1e-5) >= eps - 1e-6  # dp_accounting RDP bounds it
        assert 0 < eps <= 8.0
        assert entries[0]["epsilon"] < entries[1]["epsilon"]  # cumulative, not per round
        assert verify_ledger(ledger) == []


def test_client_level_dp_is_reported_apart_and_audited(private_run):
    """Client-level epsilon (unit = silo) sits beside, never in, the record-level epsilons,
    equals an independent RDP recomputation, and the coordinator's ledger passes audit."""
    out, proc = private_run
    assert "client-level DP (unit = one silo" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    dp = metrics["client_level_dp"]
    cfg = ClientLevelConfig(1.0, 0.5, population=2, per_round=2, delta=1e-5)
    assert dp["privacy_unit"] == "silo" and dp["releases"] == 2
    assert dp["epsilon"] == pytest.approx(client_level_epsilon(cfg, 2)["rdp"], rel=1e-9)
    assert dp["cross_check"]["pld"] == pytest.approx(client_level_epsilon(cfg, 2)["pld"])
    for n, row in enumerate(metrics["rounds"], start=1):
        assert row["client_level"]["releases"] == n
        assert row["client_level"]["epsilon"] == pytest.approx(
            client_level_epsilon(cfg, n)["rdp"])
        assert set(row["epsilon"]) == {"silo-000", "silo-001"}  # record-level, per silo
    # Released: the dense noisy mean (rank min(d_out, d_in)), never the stacked factors.
    updates = np.load(out / "checkpoint" / "updates.npz")
    a_shapes = [v.shape for k, v in updates.items() if k.endswith(".lora_A")]
    assert a_shapes and all(shape[0] in (16, 32) for shape in a_shapes)
    assert not any(k.endswith(".lora_w") for k in updates)
    ledgers = sorted((out / "ledgers").glob("*.jsonl"))
    assert [p.name for p in ledgers] == ["_client_level.jsonl", "silo-000.jsonl",
                                         "silo-001.jsonl"]
    audit = _silotune("audit", *map(str, ledgers), cwd=out.parent)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "client-level DP, unit = one silo" in audit.stdout


def test_non_private_run_is_labelled_and_reproducible(tiny_model_dir, toy_dataset_file,
                                                       tmp_path):
    accuracies = []
    for name in ("a", "b"):
        proc = _silotune("simulate", "--model", str(tiny_model_dir), "--dataset",
                         str(toy_dataset_file), "--silos", "2", "--rounds", "1",
                         "--local-steps", "2", "--batch-size", "8", "--test-size", "30",
                         "--epsilon", "inf", "--seed", "3", "--out", str(tmp_path / name),
                         cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-5000:]
        assert "NON-PRIVATE" in proc.stdout
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["private"] is False and metrics["rounds"][0]["epsilon"] == {}
        assert not (tmp_path / name / "ledgers" / "silo-000.jsonl").exists()
        accuracies.append((metrics["rounds"][0]["accuracy"], metrics["rounds"][0]["loss"]))
    assert accuracies[0] == accuracies[1]


def test_a_second_run_into_the_same_out_is_refused_and_keeps_the_ledgers(
        private_run, tiny_model_dir, toy_dataset_file):
    """Same --out (so the same simulated silos and ledgers), a new federation: refused in
    one line before anything starts, unless --resume or --new-budget says which is meant;
    the silos' ledgers are untouched. (A silo whose budget is spent refuses before
    training: tests/unit/client/test_silo_privacy.py and test_sovereign_silo.py.)"""
    out, _ = private_run
    before = {p.name: p.read_text() for p in (out / "ledgers").glob("*.jsonl")}
    proc = _silotune("simulate", "--model", str(tiny_model_dir), "--dataset",
                     str(toy_dataset_file), "--silos", "2", "--rounds", "1",
                     "--local-steps", "3", "--batch-size", "16", "--ranks", "4,2",
                     "--test-size", "30", "--epsilon", "4", "--out", str(out), cwd=out.parent)
    assert proc.returncode == 2, proc.stderr[-5000:]
    assert "--resume" in proc.stderr and "--new-budget" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    after = {p.name: p.read_text() for p in (out / "ledgers").glob("*.jsonl")}
    assert after == before


def test_downlink_sends_only_new_rounds_and_repairs_a_lost_history(tiny_model_dir,
                                                                   toy_dataset_file,
                                                                   tmp_path):
    """Each round sends a silo only the global rounds it does not hold; a silo whose copy
    is deleted mid-run says so and gets the whole history again, in the same round."""
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "silotune.cli", "simulate", "--model", str(tiny_model_dir),
         "--dataset", str(toy_dataset_file), "--silos", "2", "--rounds", "4",
         "--local-steps", "2", "--batch-size", "8", "--test-size", "30", "--epsilon", "inf",
         "--out", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    metrics_file = out / "metrics.json"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics_file.exists() and len(json.loads(metrics_file.read_text())["rounds"]) >= 2:
            shutil.rmtree(out / "silos" / "silo-001" / "history")  # rounds 1-2 kept so far
            break
        time.sleep(0.05)
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-5000:]
    rounds = json.loads(metrics_file.read_text())["rounds"]
    assert [len(r["participants"]) for r in rounds] == [2, 2, 2, 2]
    assert all(r["excluded"] == [] for r in rounds)
    down = [r["bytes_down"] for r in rounds]
    assert down[0] == 0 and down[1] > 0  # round 2 carries round 1's update
    resent = [r for r in rounds if r["history_resent"]]
    assert [r["history_resent"] for r in resent] == [["silo-001"]]
    for r in rounds[2:]:  # one new round per silo, plus the full history once when lost
        assert (r["bytes_down"] > down[1]) == bool(r["history_resent"])
        if not r["history_resent"]:
            assert r["bytes_down"] == down[1]
