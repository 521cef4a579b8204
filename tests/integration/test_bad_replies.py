"""A reply can only cost its sender: each malformed reply is excluded with its reason,
the round completes with the rest, and no reply's number sets an aggregation weight.

Real Flower Simulation Engine; a client mod (Flower's own extension point) corrupts the
replies of some silos the way a buggy or malicious silo would: bad arrays, bad metrics,
a duplicate silo id in the hello, a 29-byte compressed array claiming a 1 GiB tensor, an
update just over the derived bound, and an absurd example count. The silos are
registered (`SILOTUNE_SILO_REGISTRY`, as `silotune coordinator` passes it), so their
weights are the registered sizes. The coordinator's memory for reading the round's
replies is measured (tracemalloc) against reading only its honest replies.
"""

from __future__ import annotations

import json
import re
import resource
import tracemalloc

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from silotune.adapters.codec import as_received
from silotune.adapters.compression import COMPRESSED_SUFFIX
from silotune.adapters.starts import seeded_start
from silotune.adapters.types import modules_from_peft
from silotune.client.app import build_client_app
from silotune.config import RunConfig
from silotune.protocol import keys as P
from silotune.protocol.codec import from_record, to_record
from silotune.protocol.messages import TrainInstruction
from silotune.server import loop
from silotune.server.registry import REGISTRY_ENV, RegisteredSilo, SiloRegistry
from silotune.server.validate import (
    BOUND_MARGIN,
    Expected,
    adam_drift,
    derived_bound,
    update_norm,
)
from silotune.simulations.silos import simulated_silos

pytestmark = pytest.mark.integration

BOMB = (1 << 14, 1 << 14)  # 1 GiB of fp32 if it were allocated


def _over_the_bound(arrays: dict[str, np.ndarray], ask: TrainInstruction) -> dict:
    """B scaled so that ||s B A||_F is 1% over the bound the coordinator derives."""
    modules = modules_from_peft(arrays)
    shapes = {m: (f.B.shape[0], f.A.shape[1]) for m, f in modules.items()}
    start = as_received(seeded_start(shapes, ask.rank, ask.init_seed), ask.wire_dtype)
    scale = ask.alpha / ask.rank
    bound = BOUND_MARGIN * derived_bound(
        Expected(rank=ask.rank, scale=scale, shapes=shapes, start=start.modules),
        adam_drift(ask.learning_rate, ask.local_steps))
    factor = 1.01 * bound / update_norm(modules.values(), scale)
    return {k: v * factor if "lora_B" in k else v for k, v in arrays.items()}


def _bomb(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One factor replaced by a compressed blob whose header claims a 2^14 x 2^14 tensor."""
    key = sorted(arrays)[0]
    header = np.array([2, *BOMB, 1, 0], dtype=np.uint32).view(np.uint8)  # ndim, shape, k
    blob = np.concatenate([header, np.array([1.0], np.float32).view(np.uint8),
                           np.array([7], np.uint32).view(np.uint8), np.packbits([1])])
    return {**{k: v for k, v in arrays.items() if k != key}, key + COMPRESSED_SUFFIX: blob}


# partition -> (fragment of the reason, change to the arrays, change to the metrics)
ARRAYS = {
    1: ("NaN", lambda a, _: {k: np.full_like(v, np.nan) for k, v in a.items()}),
    2: ("exceeds the bound", _over_the_bound),
    # a consistent pair of the wrong rank (1 instead of 2)
    3: ("expected", lambda a, _: {k: v[:1] if "lora_A" in k else v[:, :1]
                                  for k, v in a.items()}),
    4: ("no lora_B", lambda a, _: {k: v for k, v in a.items() if "lora_A" in k}),
    12: (f"compressed tensor claims shape {BOMB}", lambda a, _: _bomb(a)),
}
METRICS = {
    5: ("'num-examples' = 0 is out of range", {P.NUM_EXAMPLES: 0}),
    6: ("'num-examples' = inf is not a finite integer", {P.NUM_EXAMPLES: float("inf")}),
    7: ("'epsilon' = nan is not finite", {P.EPSILON: float("nan")}),
    8: ("'peak-memory-bytes' = inf is not a finite integer", {P.PEAK_MEMORY: float("inf")}),
    9: ("without ['delta', 'epsilon_limit'", {P.EPSILON: 1.0}),
    10: ("'base-version' = inf is not a finite integer", {P.BASE_VERSION: float("inf")}),
    13: (None, {P.NUM_EXAMPLES: 10**15}),  # valid, but its weight is its registered size
}
IMPOSTOR = 11  # claims silo-000's id in its hello
SILOS = 14
REGISTERED = {f"silo-{i:03d}": 30 + i for i in range(SILOS)}


def _corrupt(msg: Message, ctx: Context, call_next):
    reply = call_next(msg, ctx)
    index = int(ctx.node_config["partition-id"])
    if reply.has_error():
        return reply
    content = reply.content
    if msg.metadata.message_type == P.QUERY_HELLO and index == IMPOSTOR:
        claimed = RecordDict(dict(content.items()))
        claimed[P.INFO] = ConfigRecord(dict(content.config_records[P.INFO])
                                       | {P.SILO_ID: "silo-000"})
        return Message(claimed, reply_to=msg)
    if msg.metadata.message_type != "train" or (index not in ARRAYS and index not in METRICS):
        return reply
    arrays = content.array_records[P.ARRAYS]
    if index in ARRAYS:
        arrays = to_record(ARRAYS[index][1](from_record(arrays),
                                            TrainInstruction.from_message(msg)))
    metrics = dict(content.metric_records[P.METRICS]) | METRICS.get(index, (None, {}))[1]
    new = RecordDict({P.ARRAYS: arrays, P.METRICS: MetricRecord(metrics),
                      P.INFO: content.config_records[P.INFO]})
    return Message(new, reply_to=msg)


def _traced_peak(call) -> int:
    """Peak bytes Python and NumPy allocate during `call()` (after a warm-up call)."""
    call()
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_each_bad_reply_costs_only_its_sender(tiny_model_dir, toy_dataset_file, tmp_path,
                                              monkeypatch):
    from flwr.simulation import run_simulation

    from silotune.server.app import build_server_app

    SiloRegistry({s: RegisteredSilo(examples=n) for s, n in REGISTERED.items()}).save(
        tmp_path / "silos.json")
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "silos.json"))
    calls = []

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return collect(*args, **kwargs)

    collect = loop.collect
    monkeypatch.setattr(loop, "collect", recording)
    cfg = RunConfig(model=str(tiny_model_dir), dataset=str(toy_dataset_file),
                    num_silos=SILOS, rounds=1, local_steps=2, batch_size=8, lora_ranks=(2,),
                    test_size=30, partition="iid", target_epsilon=float("inf"), wire_dtype="fp32",
                    out_dir=str(tmp_path / "run"))  # max_update_norm: derived
    run_simulation(server_app=build_server_app(cfg, progress=lambda _: None),
                   client_app=build_client_app(simulated_silos(cfg), mods=[_corrupt]),
                   num_supernodes=SILOS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    row = metrics["rounds"][0]
    reasons = {e["silo"]: e["reason"] for e in row["excluded"]}
    assert row["participants"] == ["silo-000", "silo-013"], reasons
    for index, (fragment, *_) in {**ARRAYS, **METRICS}.items():
        if fragment is not None:
            assert fragment in reasons[f"silo-{index:03d}"], reasons
    impostor = [r for s, r in reasons.items() if s.startswith("node-")]
    assert len(impostor) == 1 and "claims silo id 'silo-000'" in impostor[0]
    assert np.isfinite(row["accuracy"]) and np.isfinite(row["loss"])

    # weights: the registered sizes, not the 1e15 claimed
    assert row["weights"] == {"silo-000": 30, "silo-013": 43}
    # the derived bound: reported, honest updates under it, the pushed one 1% over
    assert metrics["config"]["max_update_norm"] == "auto"
    for silo in row["participants"]:
        assert 0 < row["update_norm"][silo] < row["update_norm_bound"][silo] < 10
    norm, bound = map(float, re.findall(r"update norm (\S+) exceeds the bound (\S+) ",
                                        reasons["silo-002"])[0])
    assert norm / bound == pytest.approx(1.01, rel=2e-3)
    assert bound == pytest.approx(row["update_norm_bound"]["silo-002"], rel=1e-3)

    # memory: reading this round's replies vs reading only its honest ones
    [(args, kwargs)] = calls
    cfg_, roster, shapes, plans, replies = args
    honest = {s: r for s, r in replies.items() if s in row["participants"]}
    # warm up first: one-time allocations (lazy imports, caches) count in neither figure
    _traced_peak(lambda: collect(cfg_, roster, shapes, plans, replies, **kwargs))
    bad = _traced_peak(lambda: collect(cfg_, roster, shapes, plans, replies, **kwargs))
    good = _traced_peak(lambda: collect(cfg_, roster, shapes, plans, honest, **kwargs))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"coordinator reading the round's replies: {bad / 1024:.0f} KiB traced peak with "
          f"{len(replies) - len(honest)} bad replies vs {good / 1024:.0f} KiB with only the "
          f"{len(honest)} honest ones; process peak RSS {rss:.0f} MiB")
    # per reply read (13 replies vs 2): a shape bomb allocated would add 1 GiB here
    assert bad / len(replies) < 2 * good / len(honest)
