"""One-run audit (Steinke, Nasr & Jagielski, arXiv 2305.08846): golden values from
docs/privacy.md §5, monotonicity, score-based audit, AUC and input validation."""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import numpy as np
import pytest

from silotune.privacy.one_run_audit import (
    AuditResult,
    audit_from_scores,
    draw_inclusion,
    epsilon_lower_bound,
    seed_commitment,
)

DELTA = 1e-5


def bound(m: int, r: int, v: int, significance: float = 0.05) -> float:
    return epsilon_lower_bound(m=m, r=r, v=v, delta=DELTA, significance=significance)


@pytest.mark.parametrize(("r", "v", "expected", "tol"), [
    (100, 100, 3.465, 0.005), (100, 90, 1.626, 0.005),
    (10, 10, 1.02, 0.02), (50, 50, 2.76, 0.02), (300, 300, 4.58, 0.02), (1000, 1000, 5.78, 0.02),
])
def test_known_values(r: int, v: int, expected: float, tol: float) -> None:
    assert bound(1000, r, v) == pytest.approx(expected, abs=tol)


def test_large_m_ceiling() -> None:
    assert bound(10_000, 5000, 5000) == pytest.approx(7.14, abs=0.02)


def test_monotone_in_v() -> None:
    eps = [bound(1000, 100, v) for v in range(50, 101, 5)]
    assert all(b >= a for a, b in itertools.pairwise(eps))
    assert eps[-1] > eps[-2] > eps[-4] > 0.0


def test_monotone_in_r_when_all_correct() -> None:
    eps = [bound(1000, r, r) for r in (2, 10, 50, 100, 300, 500, 1000)]
    assert all(b > a for a, b in itertools.pairwise(eps))


def test_monotone_in_significance_and_delta() -> None:
    assert bound(1000, 100, 100, 0.01) < bound(1000, 100, 100, 0.05)
    loose = epsilon_lower_bound(m=1000, r=100, v=100, delta=1e-3)
    assert loose < bound(1000, 100, 100) <= epsilon_lower_bound(m=1000, r=100, v=100, delta=0.0)


@pytest.mark.parametrize(("r", "v"), [(100, 50), (100, 55), (0, 0), (10, 0), (1, 1)])
def test_not_rejected_at_zero_gives_zero(r: int, v: int) -> None:
    assert bound(1000, r, v) == 0.0


def test_bound_is_a_root() -> None:
    from silotune.privacy.one_run_audit import p_value

    eps = bound(1000, 100, 90)
    assert p_value(eps, 1000, 100, 90, DELTA) == pytest.approx(0.05, abs=1e-6)
    assert p_value(eps + 0.01, 1000, 100, 90, DELTA) > 0.05


def test_perfect_scores_reach_ceiling() -> None:
    inc = draw_inclusion(1000, np.random.default_rng(1))
    scores = inc.astype(float) + np.random.default_rng(2).uniform(0, 0.5, size=1000)
    res = audit_from_scores(scores, inc, delta=DELTA)
    assert isinstance(res, AuditResult)
    assert res.m == 1000 and res.v == res.r == res.k_pos + res.k_neg
    n_grid = 5  # default grid: 5%, 10%, 20%, 50%, 100% of m
    assert res.eps_lower_bound == pytest.approx(bound(1000, res.r, res.r, 0.05 / n_grid))
    assert res.eps_lower_bound == pytest.approx(bound(1000, res.r, res.r), abs=0.5)
    assert res.eps_lower_bound > 4.0
    assert res.auc == 1.0 and res.tpr_at_fpr == {"0.001": 1.0, "0.01": 1.0, "0.1": 1.0}

    one = audit_from_scores(scores, inc, delta=DELTA, k_grid=[100])
    assert (one.r, one.v, one.k_pos, one.k_neg) == (100, 100, 50, 50)
    assert one.eps_lower_bound == pytest.approx(3.465, abs=0.005)


def test_reversed_scores() -> None:
    inc = draw_inclusion(400, np.random.default_rng(3))
    res = audit_from_scores(-inc.astype(float), inc, delta=DELTA)
    assert res.auc == 0.0 and res.eps_lower_bound == 0.0
    assert res.tpr_at_fpr["0.1"] == 0.0


def test_two_sided_guess_counts() -> None:
    scores = np.arange(10, dtype=float)  # canary 9 highest, canary 0 lowest
    inc = np.array([0, 1, 0, 0, 0, 1, 1, 0, 1, 1], dtype=bool)
    res = audit_from_scores(scores, inc, delta=DELTA, k_grid=[4])
    # top 2 (canaries 9, 8) guessed in: both right; bottom 2 (0, 1) guessed out: one right
    assert (res.r, res.v, res.k_pos, res.k_neg) == (4, 3, 2, 2)
    odd = audit_from_scores(scores, inc, delta=DELTA, k_grid=[5])
    assert (odd.r, odd.v, odd.k_pos, odd.k_neg) == (5, 3, 3, 2)  # canary 7 is out


def test_auc_with_ties_and_ints() -> None:
    inc = np.array([1, 1, 0, 0])
    assert audit_from_scores(np.array([1.0, 0.0, 0.0, -1.0]), inc, delta=DELTA).auc == 0.875
    assert audit_from_scores(np.zeros(4), inc, delta=DELTA).auc == 0.5


def test_random_scores_give_zero() -> None:
    hits = 0
    for seed in range(100):
        rng = np.random.default_rng(seed)
        inc = draw_inclusion(1000, rng)
        res = audit_from_scores(rng.normal(size=1000), inc, delta=DELTA)
        hits += res.eps_lower_bound > 0.0
        assert 0.3 < (res.auc or 0.0) < 0.7
    assert hits <= 5


def test_single_class_has_no_auc() -> None:
    res = audit_from_scores(np.arange(20.0), np.zeros(20, dtype=bool), delta=DELTA)
    assert res.auc is None and set(res.tpr_at_fpr) == {"0.001", "0.01", "0.1"}
    assert all(t is None for t in res.tpr_at_fpr.values())


def test_draw_inclusion_and_commitment() -> None:
    a = draw_inclusion(10_000, np.random.default_rng(7))
    b = draw_inclusion(10_000, np.random.default_rng(7))
    assert a.dtype == np.bool_ and a.shape == (10_000,) and np.array_equal(a, b)
    assert 0.47 < a.mean() < 0.53
    seed = b"\x01" * 32
    assert seed_commitment(seed) == hashlib.sha256(seed).hexdigest()
    assert len(seed_commitment(seed)) == 64 and seed_commitment(seed) != seed_commitment(b"x")


@pytest.mark.parametrize("kwargs", [
    {"m": 10, "r": 11, "v": 5}, {"m": 10, "r": 5, "v": 6}, {"m": 10, "r": 5, "v": -1},
    {"m": 10, "r": 5.0, "v": 5}, {"m": 10, "r": True, "v": 1},
    {"m": 10, "r": 5, "v": 5, "delta": 1.0}, {"m": 10, "r": 5, "v": 5, "delta": -1e-9},
    {"m": 10, "r": 5, "v": 5, "significance": 0.0},
    {"m": 10, "r": 5, "v": 5, "significance": 1.0},
    {"m": 10, "r": 5, "v": 5, "delta": float("nan")},
])
def test_bound_validation(kwargs: dict[str, Any]) -> None:
    kwargs.setdefault("delta", DELTA)
    with pytest.raises(ValueError):
        epsilon_lower_bound(**kwargs)


@pytest.mark.parametrize(("scores", "included", "extra"), [
    (np.zeros(4), np.zeros(3, dtype=bool), {}),
    (np.zeros((2, 2)), np.zeros((2, 2), dtype=bool), {}),
    (np.zeros(0), np.zeros(0, dtype=bool), {}),
    (np.array([0.0, np.nan]), np.array([True, False]), {}),
    (np.zeros(2), np.array([0.0, 1.0]), {}),
    (np.zeros(2), np.array([0, 2]), {}),
    (np.zeros(4), np.zeros(4, dtype=bool), {"k_grid": [5]}),
    (np.zeros(4), np.zeros(4, dtype=bool), {"k_grid": [0]}),
    (np.zeros(4), np.zeros(4, dtype=bool), {"k_grid": []}),
    (np.zeros(4), np.zeros(4, dtype=bool), {"significance": 1.5}),
])
def test_scores_validation(scores: np.ndarray, included: np.ndarray,
                           extra: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        audit_from_scores(scores, included, delta=DELTA, **extra)


def test_other_validation() -> None:
    with pytest.raises(ValueError):
        draw_inclusion(0, np.random.default_rng(0))
    with pytest.raises(ValueError):
        seed_commitment("not bytes")  # type: ignore[arg-type]
