"""The coordinator's round loop (FLoRA by default), on Flower's Grid.

One round (DESIGN.md): sample silos (a hello to those sampled for the first time: the
roster never contacts unsampled silos, so 10,000 silos cost what 10 do); send each the
merged rounds it does not hold yet (all of them to a silo that lost its copy) plus its
own configuration; validate the replies and
exclude bad ones; aggregate with the configured rule; merge into the global base;
evaluate on the held-out split; write metrics and a checkpoint. Flower's
`Strategy.start` is not used because the loop needs the hello handshake, per-silo
configuration and replay of the global update history.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import Grid

from silotune import strategies
from silotune.adapters.codec import as_received, update_from_arrays, update_to_arrays
from silotune.adapters.compression import decompress_arrays, upload_reference
from silotune.adapters.types import AdapterError, LowRankUpdate, SiloAdapter
from silotune.config import RunConfig
from silotune.files import atomic_write_json
from silotune.ml.assets import resolve_model
from silotune.ml.data import held_out_split
from silotune.ml.lm import evaluate, load_model
from silotune.ml.merge import apply_update, module_shapes
from silotune.planning.sensitivity import model_spec
from silotune.progress import track
from silotune.protocol import keys as P
from silotune.protocol.codec import round_digest
from silotune.protocol.messages import TrainInstruction, TrainReply
from silotune.server import checkpoint
from silotune.server.client_dp import ClientLevelRun
from silotune.server.fedpipe import configure
from silotune.server.report import write_report
from silotune.server.roster import Roster, Silo, exchange
from silotune.server.validate import Expected, validate_reply
from silotune.strategies.base import SiloPlan

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass
class GlobalState:
    """Merged rounds so far (what a silo needs to reach the current global base) and the
    global adapter that rules of the FedIT family carry on top of it."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    fingerprints: list[str] = field(default_factory=list)
    adapter: LowRankUpdate | None = None  # global adapter on top of the base (FedIT family)

    def add(self, update: LowRankUpdate, wire_dtype: str) -> LowRankUpdate:
        """Record `update` as the silos will decode it; return that version to merge."""
        version = len(self.fingerprints) + 1
        received = as_received(update, wire_dtype)
        new = update_to_arrays(received, f"{P.UPDATE_PREFIX}{version}/")
        self.arrays.update(new)
        self.scales[str(version)] = update.scale
        self.fingerprints.append(round_digest(new))
        return received

    def since(self, version: int) -> dict[str, np.ndarray]:
        """The arrays of the merged rounds after `version` (what a silo holding rounds
        1..version lacks)."""
        return {k: v for k, v in self.arrays.items()
                if int(k[len(P.UPDATE_PREFIX):].partition("/")[0]) > version}

    def updates(self) -> list[LowRankUpdate]:
        """The merged rounds' updates, in order (as the silos decode them)."""
        return [update_from_arrays(self.arrays, f"{P.UPDATE_PREFIX}{t}/", self.scales[str(t)])
                for t in range(1, len(self.fingerprints) + 1)]


def run_federation(grid: Grid, cfg: RunConfig, progress: Progress = print) -> dict[str, Any]:
    """Run `cfg.rounds` rounds; write metrics.json, checkpoints and report.html."""
    rule = strategies.create(cfg.strategy)
    out = Path(cfg.out_dir)
    for sub in ("ledgers", "checkpoint"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    model, tok = load_model(resolve_model(cfg.model, progress=progress))
    task = held_out_split(cfg.dataset, cfg.text_column, cfg.label_column, cfg.test_size,
                          cfg.seed)
    texts, gold = list(task.test["text"]), list(task.test["label"])

    def held_out(adapter: LowRankUpdate | None) -> tuple[float, float]:
        scored = model
        if adapter is not None:  # the global adapter sits on top of the base
            scored = copy.deepcopy(model)
            apply_update(scored, adapter)
        res = evaluate(scored, tok, texts, gold, task.labels, cfg.eval_batch_size)
        return res.accuracy, res.loss

    resumed = checkpoint.load(out / "checkpoint", cfg) if cfg.resume else None
    state = GlobalState()
    rng = random.Random(cfg.seed)  # public: fixes which silos are sampled
    if resumed is None:
        t0 = time.monotonic()
        base_accuracy, base_loss = held_out(None)
        progress(f"[base] held-out accuracy {base_accuracy:.3f}, loss {base_loss:.3f} "
                 f"({len(texts)} examples, {len(task.labels)} labels, "
                 f"{time.monotonic() - t0:.0f} s)")
        federation_id = checkpoint.new_federation_id()
        metrics: dict[str, Any] = {
            "config": cfg.to_json_dict(), "private": cfg.private,
            "base_accuracy": base_accuracy, "base_loss": base_loss, "rounds": []}
    else:
        state = GlobalState(resumed.arrays, resumed.scales, resumed.fingerprints,
                             resumed.adapter)
        for update in state.updates():  # the global base as of the checkpoint
            apply_update(model, update)
        rng.setstate(resumed.rng_state)
        federation_id, metrics = resumed.federation_id, resumed.metrics
        progress(f"[resume] {federation_id}: rounds 1-{resumed.round} of {cfg.rounds} "
                 f"restored from {out / 'checkpoint'}")
    metrics["federation_id"] = federation_id
    last = metrics["rounds"][-1] if metrics["rounds"] else {}
    epsilon: dict[str, float] = dict(last.get("epsilon", {}))  # silos that trained so far
    limits: dict[str, float] = dict(last.get("epsilon_limit", {}))
    roster = Roster(grid, cfg, ranks=resumed.ranks if resumed else None)
    per_round = min(len(roster), max(cfg.min_replies, round(cfg.fraction_train * len(roster))))
    client_dp = None
    if cfg.client_dp_noise > 0:  # DP-FedAvg around the rule; its own ledger and epsilon
        client_dp = ClientLevelRun(rule, cfg, len(roster), per_round, out, str(grid.run.run_id))
        rule = client_dp.rule
    client_level: dict[int, dict[str, Any]] = {}
    silos = roster.silos
    targets = cfg.lora_targets
    if cfg.profiles:  # FedPipe: targets, rank, batch and base precision per silo
        everyone = roster.everyone()
        plan = configure(grid, cfg, everyone, model_spec(model), progress)
        for s, planned in plan.silos.items():
            everyone[s].plan(planned)
        metrics["plan"] = plan.to_json()
        # the run's targets too: a run whose hello got no answer keeps a non-empty set
        targets = tuple(sorted({*cfg.lora_targets,
                                *(t for v in everyone.values() for t in v.targets)}))
    shapes = module_shapes(model, targets)
    rule.setup({s: v.rank for s, v in silos.items()} if cfg.profiles else roster.ranks(),
               shapes, cfg.seed)
    progress(f"[silos] {len(roster)} connected; each is contacted the first time it is "
             "sampled")
    first = len(metrics["rounds"]) + 1
    for round_ in track(range(first, cfg.rounds + 1), "rounds", emit=progress):
        roster.rejoin()
        start = time.monotonic()
        sampled, unreachable = roster.sample(rng, per_round)
        plans = {s: _on_wire(_restrict(rule.plan(s, silos[s].rank, state.adapter, round_),
                                       _shapes_of(shapes, silos[s].targets)),
                             cfg.wire_dtype) for s in sampled}
        messages = {s: train_message(cfg, round_, silos[s], plans[s], state, federation_id)
                    for s in sampled}
        bytes_down = sum(m.content.array_records[P.ARRAYS].count_bytes()
                         for m in messages.values())
        replies = exchange(grid, messages, cfg.round_timeout)
        lost = sorted(s for s, r in replies.items()
                      if r.has_error() and r.error.code == P.ERROR_MISSING_ROUNDS)
        if lost:  # silos that lost their copy of the history: send them all of it, once
            log.warning("resending the whole global history to %s: %s", lost,
                        "; ".join(str(replies[s].error.reason) for s in lost))
            for s in lost:
                silos[s].base_version = 0
            again = {s: train_message(cfg, round_, silos[s], plans[s], state, federation_id)
                     for s in lost}
            bytes_down += sum(m.content.array_records[P.ARRAYS].count_bytes()
                              for m in again.values())
            replies.update(exchange(grid, again, cfg.round_timeout))
        adapters, excluded, bytes_up = _collect(cfg, roster, shapes, plans, replies)
        excluded = unreachable + excluded
        for a_silo, answer in adapters.values():
            silos[a_silo.silo].base_version = answer.base_version
            if answer.epsilon is not None and answer.epsilon_limit is not None:
                epsilon[a_silo.silo] = answer.epsilon
                limits[a_silo.silo] = answer.epsilon_limit
        valid = [adapters[s][0] for s in sorted(adapters)]
        if len(valid) < cfg.min_replies:
            progress(f"[round {round_}] only {len(valid)} valid replies (< min_replies "
                     f"{cfg.min_replies}): round skipped, global model unchanged")
        else:
            result = rule.aggregate(valid, state.adapter)
            if result.merge is not None:
                apply_update(model, state.add(result.merge, cfg.wire_dtype))
            state.adapter = result.adapter
            for adapter in valid:
                silos[adapter.silo].rank = rule.next_rank(adapter, silos[adapter.silo].rank)
            if client_dp is not None:
                client_level[round_] = client_dp.record(round_)
        accuracy, loss = held_out(state.adapter)
        row = {"round": round_, "accuracy": accuracy, "loss": loss,
               "epsilon": dict(sorted(epsilon.items())),
               "epsilon_limit": dict(sorted(limits.items())),
               "bytes_up": bytes_up, "bytes_down": bytes_down,
               "seconds": round(time.monotonic() - start, 3), "excluded": excluded,
               "participants": sorted(adapters),
               "peak_memory_bytes": {s: a.peak_memory for s, (_, a) in sorted(adapters.items())
                                     if a.peak_memory is not None},
               "ranks": {s: silos[s].rank for s in sampled},
               "workers": {s: a.worker for s, (_, a) in sorted(adapters.items())},
               "history_resent": lost}
        if client_dp is not None:  # a separate guarantee (unit = silo): never added to epsilon
            row["client_level"] = client_level.get(round_)
            metrics["client_level_dp"] = client_dp.summary()
        metrics["rounds"].append(row)
        atomic_write_json(out / "metrics.json", metrics)
        checkpoint.save(out / "checkpoint", checkpoint.Checkpoint(
            round=round_, federation_id=federation_id, config=cfg.to_json_dict(),
            arrays=state.arrays, scales=state.scales, fingerprints=state.fingerprints,
            adapter=state.adapter, rng_state=rng.getstate(),
            ranks={s: v.rank for s, v in silos.items()}, metrics=metrics))
        eps_text = f", epsilon max {max(epsilon.values()):.3f}" if epsilon else ""
        progress(f"[round {round_}/{cfg.rounds}] accuracy {accuracy:.3f}, loss {loss:.3f}"
                 f"{eps_text}, {len(valid)}/{len(sampled)} silos, "
                 f"{row['seconds']:.0f} s" + (f", excluded {excluded}" if excluded else ""))
    write_report(out)
    return metrics


def train_message(cfg: RunConfig, round_: int, silo: Silo, plan: SiloPlan,
                   state: GlobalState, federation_id: str) -> Message:
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
        init_seed=plan.seed, arrays=arrays)
    return ask.to_message(silo.node_id, cfg.wire_dtype)


def _collect(cfg: RunConfig, roster: Roster, shapes: dict[str, tuple[int, int]],
             plans: dict[str, SiloPlan], replies: dict[str, Message],
             ) -> tuple[dict[str, tuple[SiloAdapter, TrainReply]], list[dict[str, str]], int]:
    """Validated adapters by silo, with the silo's typed reply; the excluded silos with
    reasons; and the bytes uploaded."""
    adapters: dict[str, tuple[SiloAdapter, TrainReply]] = {}
    excluded: list[dict[str, str]] = []
    bytes_up = 0
    for silo, reply in sorted(replies.items()):
        if reply.has_error():
            excluded.append({"silo": silo, "reason": str(reply.error.reason)})
            continue
        record = reply.content.array_records.get(P.ARRAYS)
        bytes_up += record.count_bytes() if record is not None else 0
        plan = plans[silo]
        scale = _alpha(cfg, plan.rank) / plan.rank  # computed as the silo computes it
        expected = Expected(rank=plan.rank, scale=scale,
                            shapes=_shapes_of(shapes, roster.silos[silo].targets),
                            upload=plan.upload, start=plan.init,
                            max_norm=cfg.max_update_norm)
        try:
            answer = TrainReply.from_message(reply)
            reference = upload_reference(plan.init, scale, plan.local)
            arrays = decompress_arrays(answer.arrays, reference)
            adapter = validate_reply(silo, arrays, answer.num_examples, expected)
        except (AdapterError, ValueError, KeyError) as err:
            excluded.append({"silo": silo, "reason": str(err)})
            continue
        adapters[silo] = (adapter, answer)
    excluded += [{"silo": s, "reason": "no reply before the round timeout"}
                 for s in sorted(plans) if s not in replies]
    for e in excluded:
        log.warning("round excluded %s: %s", e["silo"], e["reason"])
    return adapters, excluded, bytes_up


def _shapes_of(shapes: dict[str, tuple[int, int]], targets: tuple[str, ...]
               ) -> dict[str, tuple[int, int]]:
    """The adapted modules of a silo that trains `targets` (partial weights, FedPipe)."""
    return {m: s for m, s in shapes.items() if m.rpartition(".")[2] in targets}


def _restrict(plan: SiloPlan, shapes: dict[str, tuple[int, int]]) -> SiloPlan:
    """The plan's start limited to the modules this silo adapts (seeded starts are per
    module, so the silo regenerates exactly these from the same seed)."""
    if plan.init is None:
        return plan
    return dataclasses.replace(plan, init={m: f for m, f in plan.init.items() if m in shapes})


def _alpha(cfg: RunConfig, rank: int) -> float:
    """LoRA alpha of a silo of rank `rank` (alpha = c r, so every silo's scale is c)."""
    return cfg.lora_alpha_per_rank * rank


def _on_wire(plan: SiloPlan, wire_dtype: str) -> SiloPlan:
    """The plan with its start as the silo will decode it (so both sides agree exactly)."""
    if plan.init is None:
        return plan
    return dataclasses.replace(plan, init=as_received(LowRankUpdate(plan.init),
                                                      wire_dtype).modules)


