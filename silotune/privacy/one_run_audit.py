"""One-run privacy audit: an empirical lower bound on epsilon from a single training run.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
arXiv 2305.08846 (Theorem 3.1 / Algorithm 1). Same p-value as ``epsilon_one_run`` in
google-deepmind/jax_privacy ``jax_privacy/auditing.py``. See docs/privacy.md §5.

Each of m canaries is inserted independently with probability 1/2 (secret bits S_i). After
training, the auditor guesses "in" for the k_pos highest-scoring canaries and "out" for the
k_neg lowest; of r = k_pos + k_neg guesses, v are correct. Under (eps, delta)-DP, v is
stochastically dominated by Bin(r, e^eps / (1 + e^eps)) up to a delta term, which yields a
one-sided test; the bound is the largest eps that the observed v rejects. It is a *lower*
bound: it must never exceed the accounted epsilon, and is usually far below it.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, special, stats

from silotune.privacy.accounting import AccountingStep, compute_epsilon

DEFAULT_K_FRACTIONS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
FPR_LEVELS: tuple[float, ...] = (0.001, 0.01, 0.1)
_EPS_MAX = 100.0  # expit(100) == 1.0 in float64, so p(eps) >= 1 > significance there


@dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`audit_from_scores`.

    ``eps_lower_bound`` is the maximum over the k grid (Bonferroni-corrected, so valid at
    ``significance`` overall); ``r``, ``v``, ``k_pos``, ``k_neg`` are those of the maximising
    grid entry (the first entry if every bound is 0). ``auc`` and ``tpr_at_fpr`` describe the
    loss-threshold membership-inference attack; they are ``None`` when all canaries fall in
    one class. ``tpr_at_fpr`` keys are ``"0.001"``, ``"0.01"``, ``"0.1"``.
    """

    eps_lower_bound: float
    m: int
    r: int
    v: int
    k_pos: int
    k_neg: int
    significance: float
    delta: float
    auc: float | None
    tpr_at_fpr: dict[str, float | None] = field(default_factory=dict)


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _check_delta_significance(delta: float, significance: float) -> None:
    for name, val in (("delta", delta), ("significance", significance)):
        if isinstance(val, bool) or not isinstance(val, numbers.Real) or not math.isfinite(val):
            raise ValueError(f"{name} must be a finite number, got {val!r}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta!r}")
    if not 0.0 < significance < 1.0:
        raise ValueError(f"significance must be in (0, 1), got {significance!r}")


def p_value(eps: float, m: int, r: int, v: int, delta: float) -> float:
    """p(eps) = beta + 2 m delta alpha of arXiv 2305.08846, Theorem 3.1 (capped at 1)."""
    q = float(special.expit(eps))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0.0 or v == 0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    alpha = float(np.max((stats.binom.sf(v - i - 1, r, q) - beta) / i))
    return min(beta + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float,
                        significance: float = 0.05) -> float:
    """Largest epsilon that ``v`` correct out of ``r`` guesses on ``m`` canaries refutes.

    Parameters
    ----------
    m : int
        Number of canaries (each included independently with probability 1/2).
    r : int
        Number of guesses made (``k_pos + k_neg``); the other ``m - r`` are abstentions.
    v : int
        Number of correct guesses.
    delta : float
        The delta of the (eps, delta)-DP claim under test, in [0, 1).
    significance : float, default 0.05
        Probability, under the DP claim, that the returned bound is wrong; in (0, 1).

    Returns
    -------
    float
        The largest eps with ``p(eps) <= significance``, where ``p(eps) = beta + 2 m delta
        alpha`` with ``q = e^eps / (1 + e^eps)``, ``beta = P[Bin(r, q) >= v]`` and
        ``alpha = max_{i=1..v} (P[Bin(r, q) >= v - i] - beta) / i`` (Steinke, Nasr &
        Jagielski, NeurIPS 2023, arXiv 2305.08846, Theorem 3.1). ``0.0`` if even
        ``p(0) > significance``.

    Raises
    ------
    ValueError
        Unless ``0 <= v <= r <= m`` are integers, ``0 <= delta < 1``, ``0 < significance < 1``.
    """
    m, r, v = _int("m", m), _int("r", r), _int("v", v)
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    _check_delta_significance(delta, significance)
    delta, significance = float(delta), float(significance)

    def slack(eps: float) -> float:  # > 0 while the (eps, delta) claim is rejected
        return significance - p_value(eps, m, r, v, delta)

    if slack(0.0) <= 0.0:
        return 0.0
    lo, hi = 0.0, 1.0
    while slack(hi) > 0.0:
        if hi >= _EPS_MAX:
            return _EPS_MAX
        lo, hi = hi, min(2.0 * hi, _EPS_MAX)
    return float(optimize.brentq(slack, lo, hi, xtol=1e-9))


def default_k_grid(m: int) -> list[int]:
    return sorted({min(m, max(2, 2 * round(f * m / 2))) for f in DEFAULT_K_FRACTIONS})


def _roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic, ties counted 1/2 (average ranks)."""
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    ranks = stats.rankdata(scores)  # average ranks for ties
    u = float(ranks[labels].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> float:
    """Largest TPR over score thresholds whose FPR is at most ``fpr``."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[s[1:] != s[:-1], True]  # only thresholds between distinct scores
    tpr = np.r_[0.0, tp[last] / y.sum()]
    fprs = np.r_[0.0, fp[last] / (~y).sum()]
    return float(tpr[fprs <= fpr + 1e-12].max())


def audit_from_scores(scores: np.ndarray, included: np.ndarray, *, delta: float,
                      significance: float = 0.05,
                      k_grid: Sequence[int] | None = None) -> AuditResult:
    """One-run audit from per-canary membership scores (arXiv 2305.08846, Algorithm 1).

    Parameters
    ----------
    scores : np.ndarray
        Shape ``(m,)``, finite; higher means more likely a member, e.g. the black-box score
        ``loss_base(x) - loss_trained(x)``.
    included : np.ndarray
        Shape ``(m,)``, bool (or 0/1): the secret inclusion bits drawn by
        :func:`draw_inclusion`.
    delta : float
        The delta of the DP claim under test, in [0, 1).
    significance : float, default 0.05
        Overall significance; each of the ``len(k_grid)`` bounds is computed at
        ``significance / len(k_grid)`` (Bonferroni), so the maximum is valid at ``significance``.
    k_grid : sequence of int, optional
        Total numbers of guesses k, each in ``[1, m]``. For each k the auditor guesses "in" for
        the top ``k_pos = k - k // 2`` scores and "out" for the bottom ``k_neg = k // 2``
        (ties broken by canary index). Default: 5%, 10%, 20%, 50% and 100% of m, rounded to
        even numbers (at least 2). The grid must be fixed before looking at the scores.

    Returns
    -------
    AuditResult
        The maximum bound over the grid with its counts, plus AUC and TPR at FPR 0.1%, 1%, 10%.
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
    if inc.shape != s.shape:
        raise ValueError(f"included has shape {inc.shape}, scores has shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if inc.dtype != np.bool_:
        if not (np.issubdtype(inc.dtype, np.integer) and np.isin(inc, (0, 1)).all()):
            raise ValueError(f"included must be boolean (or 0/1), got dtype {inc.dtype}")
        inc = inc.astype(bool)
    _check_delta_significance(delta, significance)
    m = int(s.size)
    grid = default_k_grid(m) if k_grid is None else [_int("k", k) for k in k_grid]
    if not grid:
        raise ValueError("k_grid must not be empty")
    if any(not 1 <= k <= m for k in grid):
        raise ValueError(f"every k in k_grid must be in [1, m={m}], got {list(grid)}")

    order = np.argsort(-s, kind="stable")  # descending score
    inc_sorted = inc[order]
    sig_each = float(significance) / len(grid)
    best: tuple[float, int, int, int, int] | None = None
    for k in grid:
        k_neg = k // 2
        k_pos = k - k_neg
        v = int(inc_sorted[:k_pos].sum()) + int((~inc_sorted[m - k_neg:]).sum())
        eps = epsilon_lower_bound(m=m, r=k, v=v, delta=float(delta), significance=sig_each)
        if best is None or eps > best[0]:
            best = (eps, k, v, k_pos, k_neg)
    assert best is not None
    eps, r, v, k_pos, k_neg = best

    two_classes = 0 < int(inc.sum()) < m
    auc = _roc_auc(s, inc) if two_classes else None
    tpr = {f"{f:g}": (_tpr_at_fpr(s, inc, f) if two_classes else None) for f in FPR_LEVELS}
    return AuditResult(eps_lower_bound=eps, m=m, r=r, v=v, k_pos=k_pos, k_neg=k_neg,
                       significance=float(significance), delta=float(delta), auc=auc,
                       tpr_at_fpr=tpr)


def draw_inclusion(m: int, rng: np.random.Generator) -> np.ndarray:
    """Secret inclusion bits, shape ``(m,)``: canary i is trained on iff ``out[i]`` (p = 1/2).

    Seed ``rng`` from a secret, high-entropy seed (e.g. ``secrets.token_bytes(32)``) whose
    :func:`seed_commitment` is published before training (arXiv 2305.08846, Algorithm 1).
    """
    m = _int("m", m)
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng.integers(0, 2, size=m).astype(bool)


def seed_commitment(seed: bytes) -> str:
    """SHA-256 hex digest of the canary seed, published before training and opened after.

    Hiding only if the seed is unguessable: use at least 16 random bytes.
    """
    if not isinstance(seed, bytes | bytearray):
        raise ValueError(f"seed must be bytes, got {type(seed).__name__}")
    return hashlib.sha256(bytes(seed)).hexdigest()


def check_audit_entry(entry: dict[str, Any]) -> list[str]:
    """Problems with an ``audit`` ledger entry, each ``"field: what is wrong"``.

    Recomputes the bound from (m, r, v, delta, significance / k_grid_size) (Theorem 3.1 of
    arXiv 2305.08846) and, for a DP run, the accounted epsilon from (sigma, q, steps)
    with PRV; fails if the bound exceeds the accounted epsilon (the pipeline leaks more
    than it accounts: missing noise, wrong q or steps, or an opacus#820-class bug).
    """
    fields = ("m", "r", "v", "delta", "significance", "k_grid_size", "eps_lower_bound",
              "noise_multiplier", "sample_rate", "steps", "eps_accounted")
    missing = [f for f in fields if f not in entry]
    if missing:
        return [f"{missing}: missing from audit entry"]
    problems = []
    bound = epsilon_lower_bound(m=int(entry["m"]), r=int(entry["r"]), v=int(entry["v"]),
                                delta=float(entry["delta"]),
                                significance=float(entry["significance"])
                                / int(entry["k_grid_size"]))
    if not math.isclose(bound, float(entry["eps_lower_bound"]), rel_tol=1e-6, abs_tol=1e-9):
        problems.append(f"eps_lower_bound: stored {entry['eps_lower_bound']} but (m, r, v) "
                        f"give {bound}")
    sigma = float(entry["noise_multiplier"])
    if sigma > 0:
        step = AccountingStep(sigma, float(entry["sample_rate"]), int(entry["steps"]))
        eps = compute_epsilon([step], float(entry["delta"]), cross_check=False).epsilon
        stored = entry["eps_accounted"]
        if stored is None or not math.isclose(eps, float(stored), rel_tol=1e-6):
            problems.append(f"eps_accounted: stored {stored} but PRV recomputation from "
                            f"(noise_multiplier, sample_rate, steps) gives {eps}")
        if bound > eps + 1e-9:
            problems.append(f"eps_lower_bound: empirical lower bound {bound:.4f} exceeds the "
                            f"accounted epsilon {eps:.4f}: the DP-SGD pipeline leaks more "
                            "than it accounts for")
    elif entry["eps_accounted"] is not None:
        problems.append("eps_accounted: set for a run without noise (noise_multiplier 0)")
    return problems
