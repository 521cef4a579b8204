"""The coordinator's round loop (FLoRA by default), on Flower's Grid.

One round (DESIGN.md): sample silos; send each the updates of all merged rounds plus its
own configuration; validate the replies and exclude bad ones; aggregate with the
configured rule; merge into the global base; evaluate on the held-out split; write
metrics and a checkpoint. Flower's `Strategy.start` is not used because the loop needs a
hello handshake, per-silo configuration and replay of the global update history.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from silotune import protocol as P
from silotune import strategies
from silotune.assets import resolve_model
from silotune.config import RunConfig
from silotune.importance import model_spec
from silotune.lm import evaluate, load_model
from silotune.merge import apply_update, as_received, module_shapes, update_to_arrays
from silotune.server.fedpipe import configure
from silotune.server.report import write_report
from silotune.server.validate import Expected, validate_reply
from silotune.simulations.federation import federated_task
from silotune.simulations.profiles import SiloProfile
from silotune.strategies.base import AdapterError, LowRankUpdate, SiloAdapter, SiloPlan
from silotune.strategies.configurator import PlannedSilo
from silotune.transport import decompress_arrays, upload_reference
from silotune.wire import from_record, to_record

log = logging.getLogger(__name__)
Progress = Callable[[str], None]
NODE_WAIT_SECONDS = 120.0
NODE_SETTLE_SECONDS = 10.0
ROUND_TIMEOUT_SECONDS = 3600.0
HELLO_TIMEOUT_SECONDS = 600.0  # the first message also waits for each silo to start up


@dataclass
class _Silo:
    node_id: int
    num_examples: int
    rank: int
    targets: tuple[str, ...]
    batch: int
    physical_batch: int
    precision: str
    profile: SiloProfile | None = None

    def plan(self, planned: PlannedSilo) -> None:
        """Take the FedPipe configurator's choice for this silo."""
        c = planned.best.choice
        self.rank, self.targets, self.precision = c.rank, c.targets, c.precision
        self.batch = self.physical_batch = c.batch  # the memory model's micro-batch


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
        digest = hashlib.sha256()
        for key in sorted(new):
            digest.update(key.encode())
            digest.update(new[key].tobytes())
        self.arrays.update(new)
        self.scales[str(version)] = update.scale
        self.fingerprints.append(digest.hexdigest())
        return received


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

    t0 = time.monotonic()
    base_accuracy, base_loss = held_out(None)
    progress(f"[base] held-out accuracy {base_accuracy:.3f}, loss {base_loss:.3f} "
             f"({len(texts)} examples, {len(task.labels)} labels, "
             f"{time.monotonic() - t0:.0f} s)")
    silos = _hello(grid, cfg)
    plan = None
    if cfg.profiles:  # FedPipe: targets, rank, batch and base precision per silo
        plan = configure(grid, cfg, {s: v.node_id for s, v in silos.items()},
                         {s: v.profile for s, v in silos.items()}, model_spec(model),
                         progress)
        for s, planned in plan.silos.items():
            silos[s].plan(planned)
    shapes = module_shapes(model, tuple(sorted({*cfg.lora_targets,
                                                *(t for v in silos.values() for t in v.targets)})))
    rule.setup({s: v.rank for s, v in silos.items()}, shapes, cfg.seed)
    progress(f"[hello] {len(silos)} silos: " + ", ".join(
        f"{s} (n={v.num_examples}, r={v.rank})" for s, v in sorted(silos.items())))
    metrics: dict[str, Any] = {
        "config": cfg.to_json_dict(), "private": cfg.private,
        "base_accuracy": base_accuracy, "base_loss": base_loss, "rounds": []}
    if plan is not None:
        metrics["plan"] = plan.to_json()
    state = _GlobalState()
    epsilon: dict[str, float] = {}
    limits: dict[str, float] = {}
    rng = random.Random(cfg.seed)  # public: fixes which silos are sampled
    for round_ in range(1, cfg.rounds + 1):
        start = time.monotonic()
        k = min(len(silos), max(cfg.min_replies, round(cfg.fraction_train * len(silos))))
        sampled = sorted(rng.sample(sorted(silos), k))
        plans = {s: _on_wire(_restrict(rule.plan(s, silos[s].rank, state.adapter, round_),
                                       _shapes_of(shapes, silos[s].targets)),
                             cfg.wire_dtype) for s in sampled}
        messages = [_train_message(cfg, round_, silos[s], plans[s], state) for s in sampled]
        bytes_down = sum(m.content.array_records[P.ARRAYS].count_bytes() for m in messages)
        replies = grid.send_and_receive(messages, timeout=ROUND_TIMEOUT_SECONDS)
        adapters, excluded, bytes_up = _collect(cfg, silos, shapes, plans, replies)
        for a_silo, reply_metrics in adapters.values():
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
        accuracy, loss = held_out(state.adapter)
        row = {"round": round_, "accuracy": accuracy, "loss": loss,
               "epsilon": dict(sorted(epsilon.items())),
               "epsilon_limit": dict(sorted(limits.items())),
               "bytes_up": bytes_up, "bytes_down": bytes_down,
               "seconds": round(time.monotonic() - start, 3), "excluded": excluded,
               "participants": sorted(adapters),
               "peak_memory_bytes": {s: int(m[P.PEAK_MEMORY])
                                     for s, (_, m) in sorted(adapters.items())
                                     if P.PEAK_MEMORY in m},
               "ranks": {s: v.rank for s, v in sorted(silos.items())}}
        metrics["rounds"].append(row)
        _write_json(out / "metrics.json", metrics)
        _write_checkpoint(out / "checkpoint", round_, state)
        eps_text = f", epsilon max {max(epsilon.values()):.3f}" if epsilon else ""
        progress(f"[round {round_}/{cfg.rounds}] accuracy {accuracy:.3f}, loss {loss:.3f}"
                 f"{eps_text}, {len(valid)}/{len(sampled)} silos, "
                 f"{row['seconds']:.0f} s" + (f", excluded {excluded}" if excluded else ""))
    write_report(out)
    return metrics


def _hello(grid: Grid, cfg: RunConfig) -> dict[str, _Silo]:
    """Wait for the silos to connect, then ask each for its id and example count.

    Waits for `cfg.num_silos` nodes, or goes on with those present once the count has
    been stable for NODE_SETTLE_SECONDS (at least `cfg.min_replies` of them).
    """
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    nodes = sorted(grid.get_node_ids())
    stable_since = time.monotonic()
    while len(nodes) < cfg.num_silos and time.monotonic() < deadline:
        if len(nodes) >= cfg.min_replies and time.monotonic() - stable_since > NODE_SETTLE_SECONDS:
            log.warning("going on with %d of %d expected silos", len(nodes), cfg.num_silos)
            break
        time.sleep(0.5)
        now = sorted(grid.get_node_ids())
        if now != nodes:
            nodes, stable_since = now, time.monotonic()
    if len(nodes) < cfg.min_replies:
        raise RuntimeError(f"only {len(nodes)} silos connected within {NODE_WAIT_SECONDS:.0f}"
                           f" s; need at least {cfg.min_replies}")
    asks = [Message(RecordDict(), dst_node_id=n, message_type=P.QUERY_HELLO) for n in nodes]
    found: dict[str, tuple[int, int, SiloProfile | None]] = {}
    for reply in grid.send_and_receive(asks, timeout=HELLO_TIMEOUT_SECONDS):
        if reply.has_error():
            log.warning("node %s failed the hello: %s", reply.metadata.src_node_id,
                        reply.error.reason)
            continue
        silo = str(reply.content.config_records[P.INFO][P.SILO_ID])
        count = reply.content.metric_records[P.METRICS][P.NUM_EXAMPLES]
        n = P.as_int(count, P.NUM_EXAMPLES)
        if silo in found:
            raise RuntimeError(f"two nodes claim silo id '{silo}'; silo ids must be unique")
        declared = reply.content.config_records.get(P.PROFILE)
        profile = SiloProfile.from_node_config(dict(declared)) if declared else None
        found[silo] = (reply.metadata.src_node_id, n, profile)
    return {s: _Silo(node, n, cfg.rank_of(i), cfg.lora_targets, cfg.batch_size,
                     cfg.physical_batch_size, cfg.base_precision, profile)
            for i, (s, (node, n, profile)) in enumerate(sorted(found.items()))}


def _train_message(cfg: RunConfig, round_: int, silo: _Silo, plan: SiloPlan,
                   state: _GlobalState) -> Message:
    config = ConfigRecord({
        P.ROUND: round_, P.RANK: plan.rank, P.ALPHA: _alpha(cfg, plan.rank),
        P.TARGETS: ",".join(silo.targets), P.LOCAL_STEPS: cfg.local_steps,
        P.PLANNED_ROUNDS: cfg.rounds, P.BATCH_SIZE: silo.batch,
        P.PHYSICAL_BATCH_SIZE: silo.physical_batch, P.BASE_PRECISION: silo.precision,
        P.LEARNING_RATE: cfg.learning_rate, P.RUN_SEED: cfg.seed,
        P.FROZEN_FACTORS: ",".join(plan.frozen), P.UPLOAD_FACTORS: ",".join(plan.upload),
        P.LOCAL_FACTORS: ",".join(plan.local), P.WIRE_DTYPE: cfg.wire_dtype,
        P.UPLOAD_DENSITY: cfg.upload_density,
        P.UPDATE_SCALES: json.dumps(state.scales),
        P.BASE_FINGERPRINTS: json.dumps(state.fingerprints)})
    arrays = dict(state.arrays)
    if plan.seed is not None:  # the silo regenerates a seeded start: nothing to download
        config[P.INIT_SEED] = plan.seed
    elif plan.init is not None:
        arrays.update(update_to_arrays(LowRankUpdate(plan.init), P.INIT_PREFIX))
    content = RecordDict({P.ARRAYS: to_record(arrays, cfg.wire_dtype), P.CONFIG: config})
    return Message(content, dst_node_id=silo.node_id, message_type=MessageType.TRAIN)


def _collect(cfg: RunConfig, silos: dict[str, _Silo], shapes: dict[str, tuple[int, int]],
             plans: dict[str, SiloPlan], replies: Iterable[Message],
             ) -> tuple[dict[str, tuple[SiloAdapter, dict[str, Any]]], list[dict[str, str]], int]:
    sampled = sorted(plans)
    by_node = {silos[s].node_id: s for s in sampled}
    adapters: dict[str, tuple[SiloAdapter, dict[str, Any]]] = {}
    excluded: list[dict[str, str]] = []
    bytes_up = 0
    for reply in replies:
        silo = by_node.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
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
                            shapes=_shapes_of(shapes, silos[silo].targets),
                            upload=plan.upload, start=plan.init,
                            max_norm=cfg.max_update_norm)
        try:
            reference = upload_reference(plan.init, scale, plan.local)
            arrays = decompress_arrays(from_record(record), reference)
            adapter = validate_reply(silo, arrays, metrics.get(P.NUM_EXAMPLES), expected)
        except (AdapterError, ValueError, KeyError) as err:
            excluded.append({"silo": silo, "reason": str(err)})
            continue
        adapters[silo] = (adapter, dict(metrics))
    answered = set(adapters) | {e["silo"] for e in excluded}
    excluded += [{"silo": s, "reason": "no reply before the round timeout"}
                 for s in sampled if s not in answered]
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


def _write_checkpoint(folder: Path, round_: int, state: _GlobalState) -> None:
    """Global update history (enough to rebuild the global base from the original)."""
    tmp = folder / "updates.tmp.npz"
    np.savez(tmp, allow_pickle=False, **state.arrays)
    tmp.replace(folder / "updates.npz")
    if state.adapter is not None:
        np.savez(tmp, allow_pickle=False, **update_to_arrays(state.adapter, ""))
        tmp.replace(folder / "adapter.npz")
    _write_json(folder / "state.json", {"round": round_, "scales": state.scales,
                                        "fingerprints": state.fingerprints})
