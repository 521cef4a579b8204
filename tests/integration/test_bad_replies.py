"""Bad replies are excluded with their reason and the round completes with the rest.

Real Flower Simulation Engine; a client mod (Flower's own extension point) corrupts the
replies of some silos the way a buggy or malicious silo would.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from silotune.client.app import build_client_app
from silotune.config import RunConfig
from silotune.protocol import keys as P
from silotune.protocol.codec import from_record, to_record
from silotune.simulations.silos import simulated_silos

pytestmark = pytest.mark.integration

CORRUPTIONS = {
    1: ("NaN", lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()}),
    2: ("exceeds the bound", lambda a: {k: v * 1e6 for k, v in a.items()}),
    # a consistent pair of the wrong rank (1 instead of 2)
    3: ("expected", lambda a: {k: v[:1] if "lora_A" in k else v[:, :1] for k, v in a.items()}),
    4: ("no lora_B", lambda a: {k: v for k, v in a.items() if "lora_A" in k}),
    5: ("positive integer", None),  # zero examples
}


def _corrupt(msg: Message, ctx: Context, call_next):
    reply = call_next(msg, ctx)
    index = int(ctx.node_config["partition-id"])
    if msg.metadata.message_type != "train" or index not in CORRUPTIONS or reply.has_error():
        return reply
    _, change = CORRUPTIONS[index]
    content = reply.content
    metrics = dict(content.metric_records[P.METRICS])
    if change is None:
        metrics[P.NUM_EXAMPLES] = 0
        arrays = content.array_records[P.ARRAYS]
    else:
        arrays = to_record(change(from_record(content.array_records[P.ARRAYS])))
    new = RecordDict({P.ARRAYS: arrays, P.METRICS: MetricRecord(metrics),
                      P.INFO: content.config_records[P.INFO]})
    return Message(new, reply_to=msg)


def test_each_bad_reply_kind_is_excluded_and_the_round_completes(
        tiny_model_dir, toy_dataset_file, tmp_path):
    from flwr.simulation import run_simulation

    from silotune.server.app import build_server_app

    cfg = RunConfig(model=str(tiny_model_dir), dataset=str(toy_dataset_file), num_silos=6,
                    rounds=1, local_steps=2, batch_size=8, lora_ranks=(2,), test_size=30,
                    target_epsilon=float("inf"), wire_dtype="fp32", max_update_norm=100.0,
                    out_dir=str(tmp_path / "run"))
    run_simulation(server_app=build_server_app(cfg, progress=lambda _: None),
                   client_app=build_client_app(simulated_silos(cfg), mods=[_corrupt]),
                   num_supernodes=6,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 2, "include_dashboard": False}})
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"][0]
    reasons = {e["silo"]: e["reason"] for e in row["excluded"]}
    assert row["participants"] == ["silo-000"]
    for index, (fragment, _) in CORRUPTIONS.items():
        assert fragment in reasons[f"silo-{index:03d}"], reasons
    assert np.isfinite(row["accuracy"]) and np.isfinite(row["loss"])
