"""Privacy accounting for record-level DP-SGD (Poisson-subsampled Gaussian).

The budget belongs to a silo's dataset, so every local step of every round and every run on
that dataset is composed into one cumulative ``history`` of ``(sigma, q, steps)`` segments.

Reported value: the PRV upper bound of Opacus ``PRVAccountant`` (Gopi, Lee & Wutschitz,
"Numerical Composition of Differential Privacy", NeurIPS 2021, arXiv 2106.02848; eps_error
0.01, delta_error delta/1000). If PRV raises (opacus#591, #601, #604): RDP from Google
``dp_accounting`` (Mironov, "Rényi Differential Privacy", CSF 2017), a valid looser bound.
Cross-check: ``dp_accounting`` PLD (discretization 1e-4) and RDP (docs/privacy.md §3).

Golden row: q=0.01, sigma=1, T=1000, delta=1e-5 gives PRV 1.8384, PLD 1.8282, RDP 2.1014.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from logging.handlers import BufferingHandler
from typing import Any

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import PRVAccountant

log = logging.getLogger(__name__)

PRV_EPS_ERROR = 0.01
PLD_DISCRETIZATION = 1e-4
_STEP_KEYS = ("noise_multiplier", "sample_rate", "steps")
Segs = list[tuple[float, float, int]]


class BudgetExhausted(RuntimeError):  # noqa: N818 (name fixed by the project API)
    """Raised when a round would take a dataset's cumulative epsilon over its limit."""

    def __init__(self, message: str, *, spent: float | None = None, limit: float | None = None,
                 projected: float | None = None) -> None:
        super().__init__(message)
        self.spent, self.limit, self.projected = spent, limit, projected


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class AccountingStep:
    """One DP-SGD segment: ``steps`` Poisson-subsampled Gaussian steps at ``(sigma, q)``.

    ``noise_multiplier`` sigma > 0 (noise std / clipping norm), ``sample_rate`` q in (0, 1]
    (Opacus uses ``1 / len(loader)``), ``steps`` >= 0 logical (optimizer) steps.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma = _real("noise_multiplier", self.noise_multiplier)
        q = _real("sample_rate", self.sample_rate)
        if sigma <= 0:
            raise ValueError(f"noise_multiplier must be > 0, got {sigma}")
        if not 0 < q <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {q}")
        steps = self.steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        for name, value in (("noise_multiplier", sigma), ("sample_rate", q), ("steps", int(steps))):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, float | int]:
        """Return ``{"noise_multiplier", "sample_rate", "steps"}`` (the ledger format)."""
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.steps}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AccountingStep:
        """Parse the ledger format; raise ``ValueError`` on missing/extra keys or bad values."""
        if not isinstance(d, Mapping):
            raise ValueError(f"accounting step must be a mapping, got {type(d).__name__}")
        missing, extra = [k for k in _STEP_KEYS if k not in d], sorted(set(d) - set(_STEP_KEYS))
        if missing or extra:
            raise ValueError(f"accounting step needs exactly keys {list(_STEP_KEYS)}; "
                             f"missing {missing}, unexpected {extra}")
        return cls(d["noise_multiplier"], d["sample_rate"], d["steps"])


@dataclass(frozen=True)
class EpsilonReport:
    """Cumulative epsilon at a given delta.

    ``epsilon`` is the Opacus PRV upper bound (``accountant="prv"``) or dp_accounting RDP if
    PRV raised (``accountant="rdp"``); ``cross_check`` holds dp_accounting ``{"pld", "rdp"}``
    (empty when not requested).
    """

    epsilon: float
    accountant: str
    cross_check: dict[str, float]


def _segments(history: Sequence[AccountingStep]) -> Segs:
    """Drop zero-step segments and merge consecutive identical (sigma, q) segments."""
    out: Segs = []
    for s in history:
        if not isinstance(s, AccountingStep):
            raise TypeError(f"history items must be AccountingStep, got {type(s).__name__}")
        if s.steps and out and out[-1][:2] == (s.noise_multiplier, s.sample_rate):
            out[-1] = (s.noise_multiplier, s.sample_rate, out[-1][2] + s.steps)
        elif s.steps:
            out.append((s.noise_multiplier, s.sample_rate, s.steps))
    return out


def _check_delta(delta: float) -> float:
    if not 0 < _real("delta", delta) < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return float(delta)


def _event(segs: Segs) -> dp_event.DpEvent:
    return dp_event.ComposedDpEvent([
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), n)
        for sigma, q, n in segs])


@contextmanager
def _surface_absl_warnings(what: str, level: int = logging.WARNING) -> Iterator[None]:
    """Collect dp_accounting's absl warnings (e.g. "failed to converge"), log one summary."""
    absl, handler = logging.getLogger("absl"), BufferingHandler(capacity=1 << 30)
    handler.setLevel(logging.WARNING)
    propagate, absl.propagate = absl.propagate, False
    absl.addHandler(handler)
    try:
        yield
    finally:
        absl.removeHandler(handler)
        absl.propagate = propagate
        if handler.buffer:
            log.log(level, "%s: dp_accounting emitted %d warning(s) (bound stays valid; orders "
                    "that fail to converge are excluded); first: %s",
                    what, len(handler.buffer), handler.buffer[0].getMessage())


def _rdp(segs: Segs, delta: float, quiet: bool = False, pld: bool = False) -> float:
    """dp_accounting RDP (or PLD with ``pld=True``) epsilon of ``segs``."""
    if not segs:
        return 0.0
    acc = (pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
           if pld else rdp_privacy_accountant.RdpAccountant())
    level = logging.DEBUG if quiet else logging.INFO  # harmless: orders are excluded
    with _surface_absl_warnings("PLD" if pld else "RDP", level):
        return float(acc.compose(_event(segs)).get_epsilon(delta))


def _prv_or_rdp(segs: Segs, delta: float) -> tuple[float, str]:
    if not segs:
        return 0.0, "prv"
    try:
        acc, acc.history = PRVAccountant(), list(segs)
        # At q = 1 Opacus' PRV takes log(1 - q) = -inf on purpose (its np.where then picks
        # the branch for t <= log(1 - q)); numpy's "divide by zero" warning for it is noise.
        with np.errstate(divide="ignore"):
            eps = float(acc.get_epsilon(delta, eps_error=PRV_EPS_ERROR,
                                        delta_error=delta / 1000))
        if not math.isfinite(eps) or eps < 0:
            raise RuntimeError(f"PRV returned {eps}")
        return eps, "prv"
    except Exception as exc:  # Opacus PRV fails for some (sigma, q, T, delta); see module doc
        log.warning("PRV accountant failed (%s: %s) for %s; falling back to RDP",
                    type(exc).__name__, exc, segs)
        return _rdp(segs, delta), "rdp"


def compute_epsilon(history: Sequence[AccountingStep], delta: float, *,
                    cross_check: bool = True) -> EpsilonReport:
    """Cumulative epsilon of ``history`` at ``delta``: PRV (Gopi et al. 2021), RDP fallback.

    ``history`` holds every segment ever run on the dataset (sequential composition);
    ``cross_check`` adds dp_accounting PLD and RDP (~0.5 s). Empty history gives 0.0.
    """
    delta, segs = _check_delta(delta), _segments(history)
    eps, accountant = _prv_or_rdp(segs, delta)
    checks = {"pld": _rdp(segs, delta, pld=True), "rdp": _rdp(segs, delta)} if cross_check else {}
    return EpsilonReport(epsilon=eps, accountant=accountant, cross_check=checks)


def compute_epsilon_rdp(history: Sequence[AccountingStep], delta: float) -> float:
    """Cumulative epsilon from dp_accounting RDP (Mironov 2017); fast and independent of Opacus."""
    return _rdp(_segments(history), _check_delta(delta))


def calibrate_noise_multiplier(*, prior: Sequence[AccountingStep], sample_rate: float,
                               steps: int, target_epsilon: float, delta: float,
                               rel_tol: float = 0.01) -> float:
    """Smallest sigma with PRV epsilon of ``prior + [(sigma, q, steps)]`` <= target.

    A bracketed log-space bisection on the PRV bound (Gopi et al. 2021), started from the
    RDP calibration, stops once the feasible end is within ``rel_tol`` of the target.
    Raises ``BudgetExhausted`` if ``prior`` alone already reaches ``target_epsilon``.
    """
    delta, target = _check_delta(delta), _real("target_epsilon", target_epsilon)
    if target <= 0 or AccountingStep(1.0, sample_rate, steps).steps == 0:  # validates q, steps
        raise ValueError(f"need target_epsilon > 0 and steps > 0, got {target}, {steps}")
    spent, _ = _prv_or_rdp(_segments(prior), delta)
    if spent >= target:
        raise BudgetExhausted(
            f"privacy budget exhausted before calibration: epsilon already spent on this dataset "
            f"is {spent:.4f} >= target {target:.4f} (delta={delta:g}); raise the budget or stop "
            f"using this dataset", spent=spent, limit=target)

    def seg(s: float) -> Segs:
        return _segments([*prior, AccountingStep(s, sample_rate, steps)])

    evals: dict[float, float] = {}

    def f(s: float) -> float:
        if s not in evals:
            evals[s] = _prv_or_rdp(seg(s), delta)[0]
        return evals[s]

    def rdp_ok(s: float) -> bool:  # only a starting point: its warnings are not the report
        return _rdp(seg(s), delta, quiet=True) <= target

    # RDP >= PRV, so an RDP-feasible sigma is a cheap feasible start for the PRV search.
    lo_r, hi, lo = 0.05, 1.0, None
    while not rdp_ok(hi) and hi < 1e3:
        lo_r, hi = hi, hi * 2
    if rdp_ok(hi):
        for _ in range(14):
            mid = math.sqrt(lo_r * hi)
            lo_r, hi = (lo_r, mid) if rdp_ok(mid) else (mid, hi)
    else:  # the prior alone is too loose under RDP; search with PRV from sigma = 1
        hi = 1.0
    while f(hi) > target:
        if hi > 1e4:  # the remaining budget is below the PRV error (eps_error 0.01)
            raise BudgetExhausted(f"epsilon {target} unreachable with sigma <= 1e4: {spent:.4f} "
                                  "already spent; raise the budget or stop using this dataset",
                                  spent=spent, limit=target)
        lo, hi = hi, hi * 1.5
    if lo is None:
        lo = hi * 0.9
        while f(lo) <= target and lo > 1e-2:
            hi, lo = lo, lo * 0.8
        if f(lo) <= target:
            return lo
    while f(hi) < target * (1 - rel_tol) and (hi - lo) / hi > 1e-4:
        # log-linear interpolation of log(eps) vs log(sigma), kept inside the bracket
        a, b = math.log(lo), math.log(hi)
        ga, gb = math.log(f(lo) / target), math.log(f(hi) / target)
        t = ga / (ga - gb) if ga != gb else 0.5
        mid = math.exp(a + min(max(t, 0.1), 0.9) * (b - a))
        lo, hi = (mid, hi) if f(mid) > target else (lo, mid)
    log.debug("calibrated sigma=%.6f: eps %.4f (%d PRV evaluations)", hi, f(hi), len(evals))
    return hi


def project_round(history: Sequence[AccountingStep], planned: AccountingStep, *,
                  limit_epsilon: float, delta: float) -> float:
    """Epsilon after composing ``planned`` onto ``history`` (compose first, then refuse).

    Raises ``BudgetExhausted`` if it exceeds ``limit_epsilon`` (+1e-9), naming the epsilon
    spent so far, the limit, the projected epsilon and the remedies.
    """
    limit = _real("limit_epsilon", limit_epsilon)
    projected = compute_epsilon([*history, planned], delta, cross_check=False).epsilon
    if projected > limit + 1e-9:
        spent = compute_epsilon(history, delta, cross_check=False).epsilon
        raise BudgetExhausted(
            f"privacy budget exhausted: epsilon spent so far on this dataset is {spent:.4f}, "
            f"the limit is {limit:.4f} (delta={delta:g}), and the planned round "
            f"(sigma={planned.noise_multiplier:g}, q={planned.sample_rate:g}, "
            f"{planned.steps} steps) would bring it to projected epsilon {projected:.4f}. "
            f"Raise the budget (epsilon limit), lower the steps per round, "
            f"or stop using this dataset.",
            spent=spent, limit=limit, projected=projected,
        )
    return projected


def cross_check_ok(report: EpsilonReport) -> bool:
    """docs/privacy.md §3 rule: ``|eps_prv - eps_pld| <= 0.02 + 0.01*eps_pld`` and
    ``rdp >= pld - 1e-6``.

    For an RDP-fallback report the reported value must itself be >= PLD - 1e-6.
    Returns False when the cross-check values are missing.
    """
    pld, rdp = report.cross_check.get("pld"), report.cross_check.get("rdp")
    if pld is None or rdp is None or rdp < pld - 1e-6:
        return False
    if report.accountant == "prv":
        return abs(report.epsilon - pld) <= 0.02 + 0.01 * pld
    return report.epsilon >= pld - 1e-6
