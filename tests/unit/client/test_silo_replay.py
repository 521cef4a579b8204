"""A private silo asked again for a round it already trained (its coordinator died
before the reply arrived) re-sends its kept reply: no second training, no second ledger
entry, no second spend. The ClientApp is called directly, without Flower's engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from silotune.client.app import build_client_app
from silotune.config import RunConfig
from silotune.protocol import keys as P
from silotune.protocol.codec import from_record
from silotune.server.exchange import train_message
from silotune.server.roster import Silo
from silotune.server.state import GlobalState
from silotune.simulations.silos import simulated_silos
from silotune.strategies.base import SiloPlan


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are stamped with the running task's identity, which Flower sets."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _ask(app, cfg: RunConfig, run_id: int):
    silo = Silo(node_id=7, position=0, num_examples=0, rank=2, targets=("q_proj", "v_proj"),
                batch=cfg.batch_size, physical_batch=cfg.physical_batch_size,
                precision=cfg.base_precision)
    msg = train_message(cfg, 1, silo, SiloPlan(rank=2), GlobalState(), "fed-test")
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink assigns it
    context = Context(run_id=run_id, node_id=7, node_config={"partition-id": 0},
                      state=RecordDict(), run_config={})
    return app(msg, context)


def test_round_asked_twice_is_answered_from_the_kept_reply(tiny_model_dir, toy_dataset_file,
                                                           tmp_path):
    cfg = RunConfig(model=str(tiny_model_dir), dataset=str(toy_dataset_file), num_silos=2,
                    rounds=2, local_steps=1, batch_size=8, lora_ranks=(2,), test_size=30,
                    target_epsilon=8.0, out_dir=str(tmp_path))
    app = build_client_app(simulated_silos(cfg))
    ledger = tmp_path / "ledgers" / "silo-000.jsonl"
    first = _ask(app, cfg, run_id=1)
    assert not first.has_error() and len(ledger.read_text().splitlines()) == 1
    again = _ask(app, cfg, run_id=2)  # a resumed coordinator is a new Flower run
    assert not again.has_error()
    assert len(ledger.read_text().splitlines()) == 1  # not trained, not spent twice
    entry = json.loads(ledger.read_text())
    assert (entry["run_id"], entry["round"]) == ("fed-test", 1)
    sent, resent = (from_record(m.content.array_records[P.ARRAYS]) for m in (first, again))
    assert sorted(sent) == sorted(resent)
    assert all(np.array_equal(sent[k], resent[k]) for k in sent)
    assert dict(again.content.metric_records[P.METRICS]) == dict(
        first.content.metric_records[P.METRICS])

    for kept in (tmp_path / "silos" / "silo-000").glob("last-reply.*"):
        kept.unlink()  # the reply was lost: refuse rather than train the round again
    lost = _ask(app, cfg, run_id=3)
    assert lost.has_error() and "already in this silo's ledger" in lost.error.reason
    assert len(ledger.read_text().splitlines()) == 1
