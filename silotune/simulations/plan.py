"""`silotune plan`: the FedPipe plan of a simulated federation, without training.

Runs the same steps as the coordinator does before round 1 (importance on every silo's
data, aggregation, one configuration per silo), in this process, so that a researcher
can see the plan and its binding constraints before starting a simulation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from silotune.assets import resolve_model
from silotune.config import RunConfig
from silotune.importance import model_spec, raw_sensitivities
from silotune.lm import encode, load_model
from silotune.server.fedpipe import FederationPlan
from silotune.simulations.federation import federated_task, silo_name
from silotune.simulations.profiles import mix_profiles
from silotune.strategies.configurator import plan_federation
from silotune.strategies.fedpipe import (
    aggregate_importance,
    importance_by_type,
    smoothed_sensitivity,
)


def plan_offline(cfg: RunConfig, progress: Callable[[str], None] = print) -> FederationPlan:
    """The plan `silotune simulate` with these settings would use."""
    if cfg.profiles in ("", "node"):
        raise ValueError("silotune plan needs a simulation mix (--profiles NAME)")
    model, tok = load_model(resolve_model(cfg.model, progress=progress))
    task = federated_task(cfg)
    profiles = {silo_name(i): p for i, p in enumerate(mix_profiles(cfg.profiles,
                                                                   cfg.num_silos))}
    replies, budgets = [], {}
    for i, frame in enumerate(task.silos):
        examples = [encode(tok, t, lab) for t, lab in zip(frame["text"], frame["label"],
                                                              strict=True)]
        raw = raw_sensitivities(model, examples, int(tok.pad_token_id),
                                cfg.calibration_batch, cfg.calibration_steps, cfg.seed)
        names = sorted(raw)
        smoothed = smoothed_sensitivity(np.stack([raw[n] for n in names], axis=1))
        replies.append((len(examples), dict(zip(names, map(float, smoothed), strict=True))))
        seq_len = max(len(e.input_ids) for e in examples)
        budgets[silo_name(i)] = profiles[silo_name(i)].budget(cfg.local_steps, seq_len)
        progress(f"[importance] {silo_name(i)} scored on {cfg.calibration_steps} x "
                 f"{cfg.calibration_batch} examples")
    by_type = importance_by_type(aggregate_importance(replies))
    return FederationPlan(plan_federation(model_spec(model), by_type, budgets,
                                          cfg.plan_mode), profiles, by_type)
