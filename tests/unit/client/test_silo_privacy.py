"""A silo's budget: calibrated once per run, cumulative on disk, refused before training."""

from __future__ import annotations

import pandas as pd
import pytest

from silotune.client.silo import SiloPrivacy, SiloPrivacyConfig
from silotune.privacy.accounting import AccountingStep, BudgetExhausted, compute_epsilon
from silotune.privacy.ledger import verify_ledger

FRAME = pd.DataFrame({"text": ["a b", "c d", "e f"], "label": ["x", "y", "x"]})


def _silo(tmp_path, eps=2.0):
    return SiloPrivacy(SiloPrivacyConfig(
        silo_id="s", target_epsilon=eps, delta=1e-5, max_grad_norm=1.0,
        ledger_path=tmp_path / "ledger.jsonl", key_path=tmp_path / "key.pem"))


def test_noise_is_calibrated_for_the_whole_run_and_reused(tmp_path):
    silo = _silo(tmp_path)
    sigma = silo.noise_multiplier("run-1", sample_rate=0.05, planned_steps=60)
    whole = compute_epsilon([AccountingStep(sigma, 0.05, 60)], 1e-5).epsilon
    assert 0.97 * 2.0 <= whole <= 2.0
    step = AccountingStep(sigma, 0.05, 20)
    silo.record_round(step=step, run_id="run-1", round_=1, frame=FRAME, liveness=0.1)
    assert silo.noise_multiplier("run-1", sample_rate=0.05, planned_steps=60) == sigma


def test_restart_continues_the_budget_and_refuses_before_overspending(tmp_path):
    silo = _silo(tmp_path)
    sigma = silo.noise_multiplier("run-1", sample_rate=0.05, planned_steps=40)
    step = AccountingStep(sigma, 0.05, 20)
    for round_ in (1, 2):
        silo.check_round(step)
        silo.record_round(step=step, run_id="run-1", round_=round_, frame=FRAME, liveness=0.1)
    restarted = _silo(tmp_path)  # a new process: history comes back from the ledger
    assert sum(s.steps for s in restarted.history()) == 40
    with pytest.raises(BudgetExhausted) as err:
        restarted.check_round(step)
    assert "limit" in str(err.value) and err.value.projected > 2.0
    # A new run on the same dataset only gets what is left: far more noise, same limit.
    sigma2 = restarted.noise_multiplier("run-2", sample_rate=0.05, planned_steps=20)
    assert sigma2 > 5 * sigma
    assert restarted.check_round(AccountingStep(sigma2, 0.05, 20)) <= 2.0
    assert len(restarted.ledger.entries()) == 2
    assert verify_ledger(tmp_path / "ledger.jsonl") == []


def test_reported_epsilon_is_cumulative(tmp_path):
    silo = _silo(tmp_path, eps=50.0)
    step = AccountingStep(1.0, 0.01, 100)
    reports = [silo.record_round(step=step, run_id="r", round_=t, frame=FRAME,
                                 liveness=0.1)[0].epsilon for t in (1, 2, 3)]
    assert reports == pytest.approx([0.7281, 0.9226, 1.0782], abs=2e-3)


def test_seeded_noise_is_recorded_in_the_ledger_and_named_by_the_audit(tmp_path):
    from silotune.privacy.audit import audit_ledger, format_table

    silo = _silo(tmp_path, eps=50.0)
    step = AccountingStep(1.0, 0.01, 10)
    silo.record_round(step=step, run_id="r", round_=1, frame=FRAME, liveness=0.1)
    silo.record_round(step=step, run_id="r", round_=2, frame=FRAME, liveness=0.1,
                      noise="seeded")
    with pytest.raises(ValueError, match="noise source"):
        silo.record_round(step=step, run_id="r", round_=3, frame=FRAME, liveness=0.1,
                          noise="fixed")
    assert [e["noise_seed_source"] for e in silo.ledger.entries()] == ["os", "seeded"]
    audit = audit_ledger(tmp_path / "ledger.jsonl")
    assert audit.ok and audit.seeded_noise_entries == 1
    assert "1 train entries used seeded DP noise" in format_table([audit])


def test_only_simulated_silos_take_a_noise_seed(tmp_path):
    from silotune.client.local import Silo
    from silotune.client.policy import SiloPolicy

    def silo(base, index=0):
        return Silo(f"s{index}", index, tmp_path, tmp_path / "l.jsonl", pd.DataFrame,
                    SiloPolicy(8.0, 1e-5), noise_seed_base=base)

    assert silo(None).noise_seed(1) is None  # default and deployed silos: the OS seeds it
    seeds = {silo(5, i).noise_seed(r) for i in range(3) for r in range(1, 4)}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    assert silo(5, 1).noise_seed(2) == silo(5, 1).noise_seed(2)


def test_a_deployed_silo_takes_no_noise_seed_whatever_the_run_says(tmp_path):
    from flwr.app import Context, RecordDict

    from silotune.client.local import deployed_silo
    from silotune.client.node import NodeSettings

    settings = NodeSettings(silo_id="h1", data_path=tmp_path / "d.csv", state_dir=tmp_path,
                            epsilon=8.0, delta=1e-5)
    node_config = dict(__import__("flwr.common.config", fromlist=["x"]).parse_config_args(
        [settings.to_node_config()]))
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config={"dp-noise-seed": 5})
    assert deployed_silo(context).noise_seed(1) is None
