"""Accounting: golden values from docs/privacy.md §3 and §6, composition, calibration."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from silotune.privacy import accounting
from silotune.privacy.accounting import (
    AccountingStep,
    BudgetExhausted,
    EpsilonReport,
    calibrate_noise_multiplier,
    compute_epsilon,
    compute_epsilon_rdp,
    cross_check_ok,
    project_round,
)

DELTA = 1e-5
GOLDEN = [AccountingStep(1.0, 0.01, 1000)]


@pytest.fixture(scope="module")
def golden() -> EpsilonReport:
    return compute_epsilon(GOLDEN, DELTA)


def test_golden_row(golden: EpsilonReport) -> None:
    assert golden.accountant == "prv"
    assert golden.epsilon == pytest.approx(1.8384, abs=0.002)
    assert golden.cross_check["pld"] == pytest.approx(1.8282, abs=0.002)
    assert golden.cross_check["rdp"] == pytest.approx(2.1014, abs=0.001)
    assert cross_check_ok(golden)


def test_rdp_is_independent_and_matches() -> None:
    assert compute_epsilon_rdp(GOLDEN, DELTA) == pytest.approx(2.1014, abs=0.001)


def test_cumulative_rounds_match_ledger_reference() -> None:
    rnd = AccountingStep(1.0, 0.01, 100)
    got = [compute_epsilon([rnd] * r, DELTA, cross_check=False).epsilon for r in (1, 2, 3)]
    assert got == pytest.approx([0.7281, 0.9226, 1.0782], abs=0.002)
    rdp = [compute_epsilon_rdp([rnd] * r, DELTA) for r in (1, 2, 3)]
    assert rdp == pytest.approx([1.2141, 1.3401, 1.4514], abs=0.001)


def test_cumulative_equals_single_accountant_over_all_steps(golden: EpsilonReport) -> None:
    split = compute_epsilon([AccountingStep(1.0, 0.01, 500)] * 2, DELTA)
    assert split == golden
    # zero-step segments are ignored and do not break merging
    with_zero = [AccountingStep(1.0, 0.01, 500), AccountingStep(3.0, 0.2, 0),
                 AccountingStep(1.0, 0.01, 500)]
    assert compute_epsilon(with_zero, DELTA, cross_check=False).epsilon == golden.epsilon


def test_heterogeneous_history_composes() -> None:
    a, b = AccountingStep(1.0, 0.01, 300), AccountingStep(0.8, 0.02, 200)
    both = compute_epsilon([a, b], DELTA)
    assert both.epsilon > max(compute_epsilon([x], DELTA, cross_check=False).epsilon
                              for x in (a, b))
    assert cross_check_ok(both)


def test_empty_history_is_zero() -> None:
    for h in ([], [AccountingStep(1.0, 0.01, 0)]):
        rep = compute_epsilon(h, DELTA)
        assert rep.epsilon == 0.0 and rep.cross_check == {"pld": 0.0, "rdp": 0.0}
        assert compute_epsilon_rdp(h, DELTA) == 0.0


def test_prv_failure_falls_back_to_rdp(monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        history: list[tuple[float, float, int]]

        def get_epsilon(self, *a: object, **k: object) -> float:
            raise RuntimeError("Discrete mean differs significantly from continuous mean.")

    monkeypatch.setattr(accounting, "PRVAccountant", Broken)
    with caplog.at_level(logging.WARNING, logger=accounting.__name__):
        rep = compute_epsilon(GOLDEN, DELTA)
    assert rep.accountant == "rdp"
    assert rep.epsilon == pytest.approx(2.1014, abs=0.001)
    assert "falling back to RDP" in caplog.text
    assert cross_check_ok(rep)


def test_rdp_convergence_warnings_are_surfaced(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=accounting.__name__):
        eps = compute_epsilon_rdp([AccountingStep(1.0, 0.1, 100)], DELTA)
    assert eps == pytest.approx(7.9039, abs=0.001)
    assert "failed to converge" in caplog.text


def test_step_dict_round_trip_and_validation() -> None:
    s = AccountingStep(1.0, 0.01, 100)
    assert s.to_dict() == {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100}
    assert AccountingStep.from_dict(s.to_dict()) == s
    bad: list[dict[str, Any]] = [{"noise_multiplier": 1.0, "sample_rate": 0.01},
           {**s.to_dict(), "extra": 1},
           {**s.to_dict(), "steps": 1.5},
           {**s.to_dict(), "steps": -1},
           {**s.to_dict(), "noise_multiplier": 0.0},
           {**s.to_dict(), "sample_rate": 1.5},
           {**s.to_dict(), "sample_rate": float("nan")},
           {**s.to_dict(), "noise_multiplier": "1.0"}]
    for d in bad:
        with pytest.raises(ValueError):
            AccountingStep.from_dict(d)
    with pytest.raises(ValueError, match="delta"):
        compute_epsilon(GOLDEN, 0.0)


@pytest.mark.parametrize(("prior", "q", "steps", "target"), [
    ([], 0.05, 40, 3.0),
    ([], 0.01, 1000, 3.0),
    ([AccountingStep(1.0, 0.01, 300)], 0.05, 40, 8.0),
])
def test_calibration_hits_target_from_below(prior: list[AccountingStep], q: float,
                                            steps: int, target: float) -> None:
    sigma = calibrate_noise_multiplier(prior=prior, sample_rate=q, steps=steps,
                                       target_epsilon=target, delta=DELTA)
    eps = compute_epsilon([*prior, AccountingStep(sigma, q, steps)], DELTA,
                          cross_check=False).epsilon
    assert target * 0.98 <= eps <= target


def test_calibration_matches_notes_sigma() -> None:
    # docs/privacy.md §3: eps=3, q=0.01, T=1000 -> sigma 0.8147 (PRV)
    sigma = calibrate_noise_multiplier(prior=[], sample_rate=0.01, steps=1000,
                                       target_epsilon=3.0, delta=DELTA)
    assert sigma == pytest.approx(0.8147, rel=0.01)


def test_calibration_refuses_exhausted_prior() -> None:
    with pytest.raises(BudgetExhausted, match=r"already spent.*1\.8384"):
        calibrate_noise_multiplier(prior=GOLDEN, sample_rate=0.01, steps=10,
                                   target_epsilon=1.5, delta=DELTA)


def test_project_round_within_and_over_limit() -> None:
    rnd = AccountingStep(1.0, 0.01, 100)
    assert project_round([rnd], rnd, limit_epsilon=1.0, delta=DELTA) == pytest.approx(
        0.9226, abs=0.002)
    with pytest.raises(BudgetExhausted) as info:
        project_round([rnd, rnd], rnd, limit_epsilon=1.0, delta=DELTA)
    msg, exc = str(info.value), info.value
    assert "spent so far" in msg and "0.9226" in msg  # spent
    assert "limit is 1.0000" in msg                   # the limit
    assert "projected epsilon 1.078" in msg           # what the round would cost
    for remedy in ("Raise the budget", "lower the steps", "stop using this dataset"):
        assert remedy in msg
    assert exc.spent == pytest.approx(0.9226, abs=0.002)
    assert exc.projected == pytest.approx(1.0782, abs=0.002) and exc.limit == 1.0


def test_cross_check_rule_rejects_disagreement(golden: EpsilonReport) -> None:
    off = EpsilonReport(golden.epsilon + 0.1, "prv", golden.cross_check)
    assert not cross_check_ok(off)
    assert not cross_check_ok(EpsilonReport(golden.epsilon, "prv", {}))
    loose_rdp = EpsilonReport(golden.epsilon, "prv", {"pld": 1.8282, "rdp": 1.5})
    assert not cross_check_ok(loose_rdp)


def test_prv_at_sample_rate_one_is_silent_and_stays_prv():
    """A silo whose batch covers its data (q = 1) is accounted by PRV without numpy's
    "divide by zero" warning (Opacus takes log(1 - q) = -inf on purpose): before, the
    warning filled DP logs, and as an error it sent the accounting to the RDP fallback."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = compute_epsilon([AccountingStep(1.0, 1.0, 5)], DELTA)
    assert report.accountant == "prv"
    assert report.epsilon == pytest.approx(report.cross_check["pld"], rel=0.02)
