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
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from silotune import strategies
from silotune.adapters.codec import as_received, update_from_arrays, update_to_arrays
from silotune.adapters.compression import decompress_arrays, upload_reference
from silotune.adapters.types import AdapterError, LowRankUpdate, SiloAdapter
from silotune.config import RunConfig
from silotune.ml.assets import resolve_model
from silotune.ml.lm import evaluate, load_model
from silotune.ml.merge import apply_update, module_shapes
from silotune.planning.sensitivity import model_spec
from silotune.progress import track
from silotune.protocol import keys as P
from silotune.protocol.codec import from_record, round_digest, to_record
from silotune.server import checkpoint
from silotune.server.client_dp import ClientLevelRun
from silotune.server.fedpipe import configure
from silotune.server.report import write_report
from silotune.server.roster import Roster, Silo, exchange
from silotune.server.validate import Expected, validate_reply
from silotune.simulations.federation import federated_task
from silotune.strategies.base import SiloPlan

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass
class _GlobalState:
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
    task = federated_task(cfg)
    texts, gold = list(task.test["text"]), list(task.test["label"])

    def held_out(adapter: LowRankUpdate | None) -> tuple[float, float]:
        scored = model
        if adapter is not None:  # the global adapter sits on top of the base
            scored = copy.deepcopy(model)
            apply_update(scored, adapter)
        res = evaluate(scored, tok, texts, gold, task.labels, cfg.eval_batch_size)
        return res.accuracy, res.loss

    resumed = checkpoint.load(out / "checkpoint", cfg) if cfg.resume else None
    state = _GlobalState()
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
        state = _GlobalState(resumed.arrays, resumed.scales, resumed.fingerprints,
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
        messages = {s: _train_message(cfg, round_, silos[s], plans[s], state, federation_id)
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
            again = {s: _train_message(cfg, round_, silos[s], plans[s], state, federation_id)
                     for s in lost}
            bytes_down += sum(m.content.array_records[P.ARRAYS].count_bytes()
                              for m in again.values())
            replies.update(exchange(grid, again, cfg.round_timeout))
        adapters, excluded, bytes_up = _collect(cfg, roster, shapes, plans, replies)
        excluded = unreachable + excluded
        for a_silo, reply_metrics, _ in adapters.values():
            if P.BASE_VERSION in reply_metrics:
                silos[a_silo.silo].base_version = int(reply_metrics[P.BASE_VERSION])
            if P.EPSILON in reply_metrics:
                epsilon[a_silo.silo] = float(reply_metrics[P.EPSILON])
                limits[a_silo.silo] = float(reply_metrics[P.EPSILON_LIMIT])
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
               "peak_memory_bytes": {s: int(m[P.PEAK_MEMORY])
                                     for s, (_, m, _) in sorted(adapters.items())
                                     if P.PEAK_MEMORY in m},
               "ranks": {s: silos[s].rank for s in sampled},
               "workers": {s: adapters[s][2] for s in sorted(adapters)},
               "history_resent": lost}
        if client_dp is not None:  # a separate guarantee (unit = silo): never added to epsilon
            row["client_level"] = client_level.get(round_)
            metrics["client_level_dp"] = client_dp.summary()
        metrics["rounds"].append(row)
        _write_json(out / "metrics.json", metrics)
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


def _train_message(cfg: RunConfig, round_: int, silo: Silo, plan: SiloPlan,
                   state: _GlobalState, federation_id: str) -> Message:
    config = ConfigRecord({
        P.ROUND: round_, P.FEDERATION_ID: federation_id,
        P.RANK: plan.rank, P.ALPHA: _alpha(cfg, plan.rank),
        P.TARGETS: ",".join(silo.targets), P.LOCAL_STEPS: cfg.local_steps,
        P.PLANNED_ROUNDS: cfg.rounds, P.BATCH_SIZE: silo.batch,
        P.PHYSICAL_BATCH_SIZE: silo.physical_batch, P.BASE_PRECISION: silo.precision,
        P.LEARNING_RATE: cfg.learning_rate, P.RUN_SEED: cfg.seed,
        P.FROZEN_FACTORS: ",".join(plan.frozen), P.UPLOAD_FACTORS: ",".join(plan.upload),
        P.LOCAL_FACTORS: ",".join(plan.local), P.WIRE_DTYPE: cfg.wire_dtype,
        P.UPLOAD_DENSITY: cfg.upload_density,
        P.UPDATE_SCALES: json.dumps(state.scales),
        P.BASE_FINGERPRINTS: json.dumps(state.fingerprints),
        P.FIRST_SENT_ROUND: silo.base_version + 1})
    arrays = state.since(silo.base_version)
    if plan.seed is not None:  # the silo regenerates a seeded start: nothing to download
        config[P.INIT_SEED] = plan.seed
    elif plan.init is not None:
        arrays.update(update_to_arrays(LowRankUpdate(plan.init), P.INIT_PREFIX))
    content = RecordDict({P.ARRAYS: to_record(arrays, cfg.wire_dtype), P.CONFIG: config})
    return Message(content, dst_node_id=silo.node_id, message_type=MessageType.TRAIN)


def _collect(cfg: RunConfig, roster: Roster, shapes: dict[str, tuple[int, int]],
             plans: dict[str, SiloPlan], replies: dict[str, Message],
             ) -> tuple[dict[str, tuple[SiloAdapter, dict[str, Any], str]],
                        list[dict[str, str]], int]:
    """Validated adapters by silo, with the reply metrics and the worker that trained it;
    the excluded silos with reasons; and the bytes uploaded."""
    adapters: dict[str, tuple[SiloAdapter, dict[str, Any], str]] = {}
    excluded: list[dict[str, str]] = []
    bytes_up = 0
    for silo, reply in sorted(replies.items()):
        if reply.has_error():
            excluded.append({"silo": silo, "reason": str(reply.error.reason)})
            continue
        record = reply.content.array_records.get(P.ARRAYS)
        metrics = reply.content.metric_records.get(P.METRICS)
        if record is None or metrics is None:
            excluded.append({"silo": silo, "reason": "reply lacks adapter arrays or metrics"})
            continue
        bytes_up += record.count_bytes()
        plan = plans[silo]
        scale = _alpha(cfg, plan.rank) / plan.rank  # computed as the silo computes it
        expected = Expected(rank=plan.rank, scale=scale,
                            shapes=_shapes_of(shapes, roster.silos[silo].targets),
                            upload=plan.upload, start=plan.init,
                            max_norm=cfg.max_update_norm)
        try:
            reference = upload_reference(plan.init, scale, plan.local)
            arrays = decompress_arrays(from_record(record), reference)
            adapter = validate_reply(silo, arrays, metrics.get(P.NUM_EXAMPLES), expected)
        except (AdapterError, ValueError, KeyError) as err:
            excluded.append({"silo": silo, "reason": str(err)})
            continue
        info = reply.content.config_records.get(P.INFO)
        worker = str(info.get(P.WORKER_NODE, "")) if info is not None else ""
        adapters[silo] = (adapter, dict(metrics), worker)
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


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
