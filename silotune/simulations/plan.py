"""`silotune plan`: the FedPipe plan of a simulated federation, without training.

Runs the same steps as the coordinator does before round 1 (importance on every silo's
data, aggregation, one configuration per silo), in this process, so that a researcher
can see the plan and its binding constraints before starting a simulation.
"""

from __future__ import annotations

from collections.abc import Callable

from silotune.config import ConfigError, RunConfig
from silotune.ml.assets import resolve_model
from silotune.ml.lm import encode_frame, load_model
from silotune.planning.configurator import plan_federation
from silotune.planning.importance import aggregate_importance, importance_by_type
from silotune.planning.profiles import mix_profiles
from silotune.planning.resources import CANDIDATES
from silotune.planning.sensitivity import model_spec, silo_importance
from silotune.server.fedpipe import FederationPlan
from silotune.simulations.federation import federated_task, silo_name


def plan_offline(cfg: RunConfig, progress: Callable[[str], None] = print) -> FederationPlan:
    """The plan `silotune simulate` with these settings would use."""
    if cfg.profiles in ("", "node"):
        raise ConfigError("silotune plan needs a simulation mix (--profiles NAME); with "
                          "'node' profiles the coordinator plans when the silos connect")
    model, tok = load_model(resolve_model(cfg.model, progress=progress))
    task = federated_task(cfg)
    profiles = {silo_name(i): p for i, p in enumerate(mix_profiles(cfg.profiles,
                                                                   cfg.num_silos))}
    replies, budgets = [], {}
    for i in range(task.num_silos):
        answer = silo_importance(model, encode_frame(tok, task.silo_frame(i)),
                                 int(tok.pad_token_id), cfg.calibration_batch,
                                 cfg.calibration_steps, cfg.seed)
        replies.append((answer.num_examples, answer.scores))
        budgets[silo_name(i)] = profiles[silo_name(i)].budget(cfg.local_steps,
                                                              answer.max_tokens)
        progress(f"[importance] {silo_name(i)} scored on {cfg.calibration_steps} x "
                 f"{cfg.calibration_batch} examples")
    by_type = importance_by_type(aggregate_importance(replies))
    return FederationPlan(plan_federation(model_spec(model), by_type, budgets,
                                          cfg.plan_mode), profiles, by_type)


def check_profiles(cfg: RunConfig) -> None:
    """Before the simulation starts: raise `InfeasibleProfileError` (naming the silo and
    the constraint) if some silo of the mix fits no configuration. Feasibility does not
    depend on importance, so no scoring is needed; the model is built on the meta device
    (shapes only, no weights)."""
    if cfg.profiles in ("", "node"):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(cfg.model)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    tok = AutoTokenizer.from_pretrained(path)
    task = federated_task(cfg)
    budgets = {}
    for i, profile in enumerate(mix_profiles(cfg.profiles, cfg.num_silos)):
        seq_len = max(len(e.input_ids) for e in encode_frame(tok, task.silo_frame(i)))
        budgets[silo_name(i)] = profile.budget(cfg.local_steps, seq_len)
    plan_federation(model_spec(skeleton), dict.fromkeys(CANDIDATES, 1.0), budgets,
                    cfg.plan_mode)
