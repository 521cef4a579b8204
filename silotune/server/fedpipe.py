"""The coordinator's side of FedPipe: ask the silos for importance, then plan each silo.

Before round 1: send every silo an importance query (`protocol.QUERY_IMPORTANCE`);
aggregate the per-matrix scores (`planning.importance.aggregate_importance`); build each
silo's budget from the profile it declared in its hello reply and the length of its
longest example; solve the configurator (`planning.configurator.plan_federation`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.serverapp import Grid

from silotune.config import RunConfig
from silotune.planning.configurator import (
    GB,
    PlannedSilo,
    describe,
    format_plan,
    plan_federation,
)
from silotune.planning.importance import aggregate_importance, importance_by_type
from silotune.planning.profiles import SiloProfile
from silotune.planning.resources import ModelSpec
from silotune.protocol.messages import ImportanceQuery, ImportanceReply, MessageError
from silotune.server.roster import Silo, broadcast

log = logging.getLogger(__name__)
QUERY_TIMEOUT_SECONDS = 3600.0  # as a round: scoring is one short forward/backward pass


@dataclass(frozen=True)
class FederationPlan:
    """Every silo's planned configuration and the importance it was based on."""

    silos: Mapping[str, PlannedSilo]
    profiles: Mapping[str, SiloProfile]
    importance: Mapping[str, float]  # matrix type -> aggregated share

    def to_json(self) -> dict[str, Any]:
        return {
            "importance": dict(self.importance),
            "silos": {s: {"profile": self.profiles[s].name,
                          "targets": list(p.best.choice.targets),
                          "rank": p.best.choice.rank, "batch": p.best.choice.batch,
                          "precision": p.best.choice.precision,
                          "memory_limit_bytes": p.budget.memory_bytes,
                          "memory_model_bytes": p.best.memory_bytes,
                          "round_seconds_limit": p.budget.round_seconds,
                          "round_seconds_model": p.best.seconds,
                          "binding": p.binding}
                      for s, p in self.silos.items()}}

    def table(self) -> str:
        return format_plan(self.silos, self.importance,
                           {s: p.name for s, p in self.profiles.items()})


def query_importance(grid: Grid, cfg: RunConfig, silos: Mapping[str, Silo]
                     ) -> tuple[dict[str, float], dict[str, int]]:
    """Aggregated per-matrix importance, and each silo's longest example in tokens."""
    query = ImportanceQuery(model=cfg.model, calibration_steps=cfg.calibration_steps,
                            calibration_batch=cfg.calibration_batch, run_seed=cfg.seed)
    replies, failed = broadcast(grid, silos, query, QUERY_TIMEOUT_SECONDS)
    answers: dict[str, ImportanceReply] = {}
    for silo, reply in replies.items():
        try:
            answers[silo] = ImportanceReply.from_message(reply)
        except MessageError as err:
            failed.append({"silo": silo, "reason": f"bad importance reply: {err}"})
    if failed:  # every silo needs a plan, so every silo must answer
        raise RuntimeError("the importance query failed for " + "; ".join(
            f"{f['silo']}: {f['reason']}" for f in failed) + ": check that those silos are "
            "running and can load the model")
    scored: list[tuple[int, dict[str, float]]] = []
    max_tokens: dict[str, int] = {}
    for silo, answer in answers.items():
        scored.append((answer.num_examples, answer.scores or {}))
        max_tokens[silo] = answer.max_tokens
    return aggregate_importance(scored), max_tokens


def configure(grid: Grid, cfg: RunConfig, silos: Mapping[str, Silo], spec: ModelSpec,
              progress: Callable[[str], None]) -> FederationPlan:
    """Importance query, then one configuration per silo (raises if a silo has no
    profile or none of its configurations fits)."""
    if not silos:
        raise RuntimeError("no silo answered the hello: nothing to plan")
    profiles = {s: v.profile for s, v in silos.items()}
    lacking = sorted(s for s, p in profiles.items() if p is None)
    if lacking:
        raise RuntimeError(f"silos {lacking} declared no resource profile; with "
                           f"profiles = '{cfg.profiles}' every silo needs one")
    declared = {s: p for s, p in profiles.items() if p is not None}
    scores, max_tokens = query_importance(grid, cfg, silos)
    by_type = importance_by_type(scores)
    budgets = {s: p.budget(cfg.local_steps, max_tokens[s]) for s, p in declared.items()}
    plan = FederationPlan(plan_federation(spec, by_type, budgets, cfg.plan_mode),
                          declared, by_type)
    progress(f"[plan] FedPipe configuration ({cfg.plan_mode}):\n{plan.table()}")
    for silo, p in plan.silos.items():
        log.info("plan %s: %s (%.2f GB modelled)", silo, describe(p.best.choice),
                 p.best.memory_bytes / GB)
    return plan
