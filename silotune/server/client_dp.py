"""The coordinator's side of client-level DP: wrapper, signed ledger, metrics.

The math lives in ``silotune.privacy.client_level`` (DP-FedAvg, McMahan et al. 2018);
this module wires it into a run: it wraps the run's aggregation rule, and after every
noisy round appends a signed entry to ``OUT/ledgers/_client_level.jsonl`` (the
coordinator's own ledger, signed with the key in ``OUT/coordinator/``, verified by
``silotune audit`` like a silo's) and returns the round's client-level figures for
``metrics.json``. Client-level epsilon is reported apart from the silos' record-level
epsilon: the units (a silo vs one record) differ, so the two are never added.

A resumed run (same ``OUT``) continues the release count of that ledger, so its epsilon
is the one of an uninterrupted run; a ledger written with other client-level settings is
refused rather than mixed (docs/privacy.md §4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from silotune.config import RunConfig
from silotune.privacy.client_level import (
    NEIGHBORING_RELATION,
    SAMPLING,
    ClientLevelConfig,
    ClientLevelDP,
)
from silotune.privacy.ledger import Ledger, load_or_create_signing_key, read_entries
from silotune.strategies.base import AggregationRule

LEDGER_NAME = "_client_level.jsonl"
KEY_PATH = Path("coordinator") / "ledger-signing-key.pem"


class ClientLevelRun:
    """Client-level DP for one run of ``population`` silos, ``per_round`` per round."""

    def __init__(self, rule: AggregationRule, cfg: RunConfig, population: int,
                 per_round: int, out: Path, run_id: str) -> None:
        settings = ClientLevelConfig(
            noise_multiplier=cfg.client_dp_noise, clip_norm=cfg.client_dp_clip,
            population=population, per_round=per_round, delta=cfg.target_delta)
        self.ledger_path = out / "ledgers" / LEDGER_NAME
        self.dp = ClientLevelDP(rule, settings,
                                releases=released_before(self.ledger_path, settings))
        self.ledger = Ledger(self.ledger_path, load_or_create_signing_key(out / KEY_PATH))
        self.run_id = run_id

    @property
    def rule(self) -> AggregationRule:
        return self.dp

    def record(self, round_: int) -> dict[str, Any]:
        """Append the signed entry of the round just aggregated; return its metrics row."""
        entry = self.ledger.append(self.dp.ledger_body(round_, self.run_id))
        return {"epsilon": entry["epsilon"], "delta": entry["delta"],
                "accountant": entry["accountant"], "cross_check": entry["eps_cross_check"],
                "releases": entry["releases"], "participants": entry["participants"],
                "ledger_head": entry["entry_hash"]}

    def summary(self) -> dict[str, Any]:
        """Settings and final figures for ``metrics.json["client_level_dp"]``."""
        c = self.dp.cfg
        eps = self.dp.epsilon()
        return {"privacy_unit": "silo", "neighboring_relation": NEIGHBORING_RELATION,
                "sampling": SAMPLING,
                "noise_multiplier": c.noise_multiplier, "clip_norm": c.clip_norm,
                "population": c.population, "per_round": c.per_round, "delta": c.delta,
                "releases": self.dp.releases, "epsilon": eps["rdp"], "accountant": "rdp",
                "cross_check": {k: v for k, v in eps.items() if k != "rdp"},
                "ledger": str(self.ledger_path)}


def released_before(ledger: Path, settings: ClientLevelConfig) -> int:
    """Noisy rounds already released in `ledger` (0 for a new one). Raises ValueError
    when its last entry used other settings: composing releases of different mechanisms
    under one count would misstate epsilon."""
    entries = [e for e in read_entries(ledger) if e.get("type") == "client_level"]
    if not entries:
        return 0
    last = entries[-1]
    recorded = (last.get("noise_multiplier"), last.get("clip_norm"), last.get("population"),
                last.get("per_round"), last.get("delta"))
    wanted = (settings.noise_multiplier, settings.clip_norm, settings.population,
              settings.per_round, settings.delta)
    if recorded != wanted:
        raise ValueError(
            f"{ledger} holds client-level releases with (noise, clip, silos, per round, "
            f"delta) = {recorded}, this run asks for {wanted}: resume with the same "
            "settings, or write to a new --out")
    return int(last["releases"])
