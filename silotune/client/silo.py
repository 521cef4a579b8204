"""One silo's privacy bookkeeping: noise calibration, budget guard, signed ledger.

The budget belongs to the silo's dataset, not to a run: the cumulative accounting history
is read back from the silo's ledger on disk, so restarts and new runs on the same data
keep composing (docs/privacy.md §1, §6). The ledger entry is appended and signed
*before* training touches the data, so a crash can over-count but never under-count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import opacus
import pandas as pd

from silotune.privacy.accounting import (
    AccountingStep,
    EpsilonReport,
    calibrate_noise_multiplier,
    compute_epsilon,
    project_round,
)
from silotune.privacy.fingerprint import dataset_fingerprint
from silotune.privacy.ledger import Ledger, load_or_create_signing_key


@dataclass(frozen=True)
class SiloPrivacyConfig:
    """The silo's own privacy settings (in simulation, the run's defaults)."""

    silo_id: str
    target_epsilon: float  # inf: non-private, no ledger entry, no guarantee
    delta: float
    max_grad_norm: float
    ledger_path: Path
    key_path: Path

    @property
    def private(self) -> bool:
        return math.isfinite(self.target_epsilon)


class SiloPrivacy:
    """Plans, guards and records the DP cost of each round for one silo dataset."""

    def __init__(self, cfg: SiloPrivacyConfig) -> None:
        self.cfg = cfg
        self.ledger = Ledger(cfg.ledger_path, load_or_create_signing_key(cfg.key_path))

    def history(self) -> list[AccountingStep]:
        return self.ledger.accounting_history()

    def noise_multiplier(self, run_id: str, sample_rate: float, planned_steps: int,
                         run_epsilon: float | None = None) -> float:
        """sigma for this run: re-used from the ledger if this run already trained, else
        calibrated once for the whole planned run so that the run spends at most
        `run_epsilon` (the run's target; None: no separate run budget) and prior spending
        plus the run stays within the silo's lifetime limit: the larger of the two."""
        for entry in reversed(self.ledger.entries()):
            if entry.get("type") == "train" and entry.get("run_id") == run_id:
                return float(entry["noise_multiplier"])
        sigma = calibrate_noise_multiplier(prior=self.history(), sample_rate=sample_rate,
                                           steps=planned_steps,
                                           target_epsilon=self.cfg.target_epsilon,
                                           delta=self.cfg.delta)
        if run_epsilon is not None and math.isfinite(run_epsilon) and (
                run_epsilon < self.cfg.target_epsilon):
            sigma = max(sigma, calibrate_noise_multiplier(
                prior=[], sample_rate=sample_rate, steps=planned_steps,
                target_epsilon=run_epsilon, delta=self.cfg.delta))
        return sigma

    def check_round(self, step: AccountingStep) -> float:
        """Projected cumulative epsilon after `step`; raises BudgetExhausted if over."""
        return project_round(self.history(), step, limit_epsilon=self.cfg.target_epsilon,
                             delta=self.cfg.delta)

    def record_round(self, *, step: AccountingStep, run_id: str, round_: int,
                     frame: pd.DataFrame, noise: str = "os", kind: str = "train",
                     liveness: float | None = None,
                     unit: tuple[str, int] | None = None,
                     ) -> tuple[EpsilonReport, dict[str, Any]]:
        """Compose `step`, then append and sign the ledger entry; returns (report, entry).
        `noise`: "os" (OS-seeded noise) or "seeded" (a simulation's public noise seed: the
        guarantee then holds only against those who do not know that seed). `kind`:
        "train" (DP-SGD) or "importance" (DP importance scores, FedPipe). Called before the
        data is touched (write-ahead), so `liveness` is absent from new entries. `unit`:
        the privacy unit and how many the data holds (default: one row, the rows)."""
        if noise not in ("os", "seeded"):
            raise ValueError(f"noise source must be 'os' or 'seeded', got {noise!r}")
        history = [*self.history(), step]
        report = compute_epsilon(history, self.cfg.delta)
        entry = self.ledger.append({
            "type": kind,
            "silo_id": self.cfg.silo_id,
            "run_id": run_id,
            "round": round_,
            "dataset_fingerprint": dataset_fingerprint(frame),
            "dataset_size": len(frame),
            "privacy_unit": "example" if unit is None else unit[0],
            "privacy_units": len(frame) if unit is None else unit[1],
            "neighboring_relation": "add_or_remove_one",
            "mechanism": "poisson-subsampled-gaussian",
            "noise_multiplier": step.noise_multiplier,
            "max_grad_norm": self.cfg.max_grad_norm,
            "sample_rate": step.sample_rate,
            "steps_this_entry": step.steps,
            "accounting_history": [s.to_dict() for s in history],
            "delta": self.cfg.delta,
            "epsilon": report.epsilon,
            "accountant": report.accountant,
            "eps_cross_check": report.cross_check,
            "epsilon_limit": self.cfg.target_epsilon,
            "remaining": max(0.0, self.cfg.target_epsilon - report.epsilon),
            **({} if liveness is None else {"liveness": liveness}),
            "secure_mode": False,
            "noise_seed_source": noise,
            "opacus_version": opacus.__version__,
        })
        return report, entry
