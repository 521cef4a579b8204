"""The coordinator's side of FedPipe: ask the silos for importance, then plan each silo.

Before round 1: send every silo an importance query (`protocol.QUERY_IMPORTANCE`);
aggregate the per-matrix scores of the silos whose policy lets them answer
(`planning.importance.aggregate_importance`; a DP statistic from a private silo); build
each silo's budget from the profile it declared in its hello reply and the public
truncation length; solve the configurator (`planning.configurator.plan_federation`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.serverapp import Grid

from silotune.config import RunConfig
from silotune.ml.lm import MAX_LENGTH
from silotune.planning.configurator import (
    GB,
    PlannedSilo,
    describe,
    format_plan,
    plan_federation,
)
from silotune.planning.importance import aggregate_importance, importance_by_type
from silotune.planning.profiles import SiloProfile
from silotune.planning.resources import CANDIDATES, ModelSpec
from silotune.protocol.messages import ImportanceQuery, ImportanceReply
from silotune.server import registry
from silotune.server.roster import Silo, broadcast
from silotune.server.validate import aggregation_weights

log = logging.getLogger(__name__)
QUERY_TIMEOUT_SECONDS = 3600.0  # as a round: scoring is one short forward/backward pass


@dataclass(frozen=True)
class FederationPlan:
    """Every silo's planned configuration and the importance it was based on."""

    silos: Mapping[str, PlannedSilo]
    profiles: Mapping[str, SiloProfile]
    importance: Mapping[str, float]  # matrix type -> aggregated share
    refused: list[dict[str, str]] = field(default_factory=list)  # silos that did not score

    def to_json(self) -> dict[str, Any]:
        return {
            "importance": dict(self.importance), "importance_refused": list(self.refused),
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


def query_importance(grid: Grid, cfg: RunConfig, silos: Mapping[str, Silo],
                     federation_id: str,
                     ) -> tuple[dict[str, float], dict[str, int], list[dict[str, str]]]:
    """Aggregated per-matrix importance over the silos that answered, each silo's longest
    example in tokens (the public truncation length for those that did not), and the
    silos that refused (a silo's policy decides whether it answers)."""
    query = ImportanceQuery(federation_id=federation_id, model=cfg.model,
                            calibration_steps=cfg.calibration_steps,
                            calibration_batch=cfg.calibration_batch, run_seed=cfg.seed)
    replies, refused = broadcast(grid, silos, query, QUERY_TIMEOUT_SECONDS)
    answers: dict[str, ImportanceReply] = {}
    max_tokens = dict.fromkeys(silos, MAX_LENGTH)
    for silo, reply in replies.items():
        try:
            answer = ImportanceReply.from_message(reply)
            aggregate_importance([(1, answer.scores or {})])  # its scores add up on their own
        except ValueError as err:  # MessageError, or scores whose sum overflows
            refused.append({"silo": silo, "reason": f"bad importance reply: {err}"})
            continue
        answers[silo] = answer
        max_tokens[silo] = min(answer.max_tokens, MAX_LENGTH)
    weights = aggregation_weights({s: a.num_examples for s, a in answers.items()},
                                  registry.from_environment())
    scored = [(weights[s], a.scores or {}) for s, a in sorted(answers.items())]
    for r in refused:
        log.warning("importance query: %s did not answer: %s", r["silo"], r["reason"])
    if not scored:  # nobody answered: every candidate matrix counts the same
        return dict.fromkeys(CANDIDATES, 1.0), max_tokens, refused
    return aggregate_importance(scored), max_tokens, refused


def configure(grid: Grid, cfg: RunConfig, silos: Mapping[str, Silo], spec: ModelSpec,
              federation_id: str, progress: Callable[[str], None]) -> FederationPlan:
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
    scores, max_tokens, refused = query_importance(grid, cfg, silos, federation_id)
    by_type = importance_by_type(scores)
    budgets = {s: p.budget(cfg.local_steps, max_tokens[s]) for s, p in declared.items()}
    plan = FederationPlan(plan_federation(spec, by_type, budgets, cfg.plan_mode),
                          declared, by_type, refused)
    progress(f"[plan] FedPipe configuration ({cfg.plan_mode}):\n{plan.table()}")
    for silo, p in plan.silos.items():
        log.info("plan %s: %s (%.2f GB modelled)", silo, describe(p.best.choice),
                 p.best.memory_bytes / GB)
    return plan
