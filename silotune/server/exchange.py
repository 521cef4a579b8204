"""A round's train messages out and its replies in, validated.

`train_message` builds one silo's `TrainInstruction` (the global rounds it lacks, its
plan and configuration); `collect` reads every reply as a `TrainReply` (each field's
type, range and meaning checked), decompresses it against the plan's start, validates
it (keys, shapes, finite values, the update-norm bound derived from the round's
training, docs/algorithms.md §11), excludes the bad ones with their reason and weighs
the others by the sizes the operator registered.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from flwr.app import Message

from silotune.adapters.codec import as_received, update_to_arrays
from silotune.adapters.compression import decompress_arrays, upload_reference
from silotune.adapters.types import AdapterError, LowRankUpdate, SiloAdapter
from silotune.config import RunConfig
from silotune.protocol import keys as P
from silotune.protocol.messages import TrainInstruction, TrainReply
from silotune.server import registry
from silotune.server.roster import Roster, Silo
from silotune.server.state import GlobalState
from silotune.server.validate import (
    BOUND_MARGIN,
    Expected,
    adam_drift,
    aggregation_weights,
    derived_bound,
    update_norm,
    validate_reply,
)
from silotune.strategies.base import SiloPlan

log = logging.getLogger(__name__)


def train_message(cfg: RunConfig, round_: int, silo: Silo, plan: SiloPlan,
                   state: GlobalState, federation_id: str,
                   ledger_since: int | None = None) -> Message:
    arrays = state.since(silo.base_version)
    if plan.seed is None and plan.init is not None:  # a start the silo cannot regenerate
        arrays.update(update_to_arrays(LowRankUpdate(plan.init), P.INIT_PREFIX))
    ask = TrainInstruction(
        round=round_, federation_id=federation_id, model=cfg.model, rank=plan.rank,
        alpha=_alpha(cfg, plan.rank), targets=silo.targets, local_steps=cfg.local_steps,
        planned_rounds=cfg.rounds, batch_size=silo.batch,
        physical_batch_size=silo.physical_batch, base_precision=silo.precision,
        learning_rate=cfg.learning_rate, max_grad_norm=cfg.max_grad_norm,
        target_epsilon=cfg.target_epsilon, target_delta=cfg.target_delta, run_seed=cfg.seed,
        frozen=plan.frozen, upload=plan.upload, local=plan.local, wire_dtype=cfg.wire_dtype,
        upload_density=cfg.upload_density, update_scales=dict(state.scales),
        base_fingerprints=list(state.fingerprints), first_sent_round=silo.base_version + 1,
        init_seed=plan.seed, ledger_since=ledger_since, arrays=arrays)
    return ask.to_message(silo.node_id, cfg.wire_dtype)


class Collected(NamedTuple):
    """A round's replies, read: what aggregation takes and what the round's row reports."""

    adapters: dict[str, tuple[SiloAdapter, TrainReply]]  # valid, weighted, by silo
    excluded: list[dict[str, str]]  # the others, with the reason
    bytes_up: int
    facts: dict[str, Any]  # weights, update norms and their bounds, by silo


def collect(cfg: RunConfig, roster: Roster, shapes: dict[str, tuple[int, int]],
            plans: dict[str, SiloPlan], replies: dict[str, Message], *, round_: int,
            merged: int, admit: Callable[[str, TrainReply], None] = lambda _s, _a: None,
            ) -> Collected:
    """Read every reply of round `round_` (`merged` global rounds were sent as the base):
    check its fields, decompress it against the plan's start, validate it against its
    update-norm bound; weigh the valid ones (`aggregation_weights`). `admit` sees each
    checked reply first and raises a ValueError to exclude it (the ledger head check,
    silotune/server/heads.py). Any failure, even an unforeseen exception, costs only the
    silo that sent the reply."""
    adapters: dict[str, tuple[SiloAdapter, TrainReply]] = {}
    excluded: list[dict[str, str]] = []
    bounds: dict[str, float] = {}
    bytes_up = 0
    drift = adam_drift(cfg.learning_rate, cfg.local_steps)
    for silo, reply in sorted(replies.items()):
        if reply.has_error():
            excluded.append({"silo": silo, "reason": str(reply.error.reason)})
            continue
        record = reply.content.array_records.get(P.ARRAYS)
        bytes_up += record.count_bytes() if record is not None else 0
        plan = plans[silo]
        scale = _alpha(cfg, plan.rank) / plan.rank  # computed as the silo computes it
        expected = Expected(rank=plan.rank, scale=scale,
                            shapes=shapes_of(shapes, roster.silos[silo].targets),
                            upload=plan.upload, start=plan.init)
        try:
            bounds[silo] = (cfg.max_update_norm if cfg.max_update_norm is not None else
                            BOUND_MARGIN * derived_bound(expected, drift, plan.local,
                                                         round_ - 1))
            expected = dataclasses.replace(expected, max_norm=bounds[silo])
            answer = TrainReply.from_message(reply)
            check_reply_fields(answer, silo, cfg, merged)
            admit(silo, answer)
            reference = upload_reference(plan.init, scale, plan.local)
            arrays = decompress_arrays(answer.arrays, reference, expected.array_shapes())
            declared = answer.num_examples if answer.num_examples is not None else 1
            adapter = validate_reply(silo, arrays, declared, expected)
        except (AdapterError, ValueError, KeyError) as err:
            excluded.append({"silo": silo, "reason": str(err)})
            continue
        except Exception as err:  # a reply may only cost its sender
            log.exception("reply of %s could not be handled", silo)
            excluded.append({"silo": silo, "reason": f"{type(err).__name__}: {err}"})
            continue
        adapters[silo] = (adapter, answer)
    excluded += [{"silo": s, "reason": "no reply before the round timeout"}
                 for s in sorted(plans) if s not in replies]
    weights = aggregation_weights({s: a.num_examples for s, (_, a) in adapters.items()},
                                  registry.from_environment())
    adapters = {s: (dataclasses.replace(ad, num_examples=weights[s]), a)
                for s, (ad, a) in adapters.items()}
    for e in excluded:
        log.warning("round excluded %s: %s", e["silo"], e["reason"])
    facts = {"weights": dict(sorted(weights.items())),
             "update_norm": {s: update_norm(ad.modules.values(), ad.scale)
                             for s, (ad, _) in sorted(adapters.items())},
             "update_norm_bound": dict(sorted(bounds.items()))}
    return Collected(adapters, excluded, bytes_up, facts)


def check_reply_fields(answer: TrainReply, silo: str, cfg: RunConfig, merged: int) -> None:
    """What a train reply's fields must say of the round it answers (each value's type
    and range are checked when the message is read); raises `ValueError`."""
    if answer.silo_id != silo:
        raise ValueError(f"reply claims silo id '{answer.silo_id}'; this node is '{silo}'")
    if answer.steps != cfg.local_steps:
        raise ValueError(f"reply reports {answer.steps} steps; the round asked for "
                         f"{cfg.local_steps}")
    if answer.base_version != merged:
        raise ValueError(f"reply's base-version {answer.base_version} differs from the "
                         f"{merged} merged rounds the silo was sent")
    if cfg.private and answer.epsilon is None:
        raise ValueError("a private run's reply carries no privacy accounting (epsilon, "
                         "delta, epsilon-limit)")


def shapes_of(shapes: dict[str, tuple[int, int]], targets: tuple[str, ...]
               ) -> dict[str, tuple[int, int]]:
    """The adapted modules of a silo that trains `targets` (partial weights, FedPipe)."""
    return {m: s for m, s in shapes.items() if m.rpartition(".")[2] in targets}


def restrict(plan: SiloPlan, shapes: dict[str, tuple[int, int]]) -> SiloPlan:
    """The plan's start limited to the modules this silo adapts (seeded starts are per
    module, so the silo regenerates exactly these from the same seed)."""
    if plan.init is None:
        return plan
    return dataclasses.replace(plan, init={m: f for m, f in plan.init.items() if m in shapes})


def _alpha(cfg: RunConfig, rank: int) -> float:
    """LoRA alpha of a silo of rank `rank` (alpha = c r, so every silo's scale is c)."""
    return cfg.lora_alpha_per_rank * rank


def on_wire(plan: SiloPlan, wire_dtype: str) -> SiloPlan:
    """The plan with its start as the silo will decode it (so both sides agree exactly)."""
    if plan.init is None:
        return plan
    return dataclasses.replace(plan, init=as_received(LowRankUpdate(plan.init),
                                                      wire_dtype).modules)


