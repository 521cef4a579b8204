"""The release manifest (silotune/protocol/manifest.py) against what silos really send.

Every reply kind is driven through the ClientApp on the tiny models (hello, train,
importance, and CrossLM's train.slm and query.score), and every record on the wire is
mapped back to the reply's field: each must be listed in `MANIFEST` for that reply type,
and a deployed silo (its node config, policy diagnostics off) never sends a field listed
as simulation-only. `check_reply` refuses an unlisted field before anything is sent.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from silotune.client.app import build_client_app
from silotune.client.local import Silo, SiloSource, deployed_silo
from silotune.client.policy import SiloPolicy
from silotune.config import RunConfig
from silotune.planning.profiles import SiloProfile
from silotune.protocol import keys as P
from silotune.protocol.manifest import KINDS, MANIFEST, UnlistedFieldError, check_reply, wire_keys
from silotune.protocol.messages import (
    Hello,
    HelloReply,
    ImportanceQuery,
    ImportanceReply,
    Payload,
    ScoreReply,
    ScoreRequest,
    SlmTrainReply,
    SlmTrainRequest,
    TrainReply,
)
from silotune.server.exchange import train_message
from silotune.server.roster import Silo as RosterSilo
from silotune.server.state import GlobalState
from silotune.simulations.silos import simulated_silos
from silotune.strategies.base import SiloPlan
from tests.conftest import TOY_LABELS

NODE = 7
PROFILE = SiloProfile("lab", memory_gb=16.0, gflops=100.0, upload_mbps=50.0,
                      download_mbps=100.0, round_seconds=600.0)
# The records whose entries are fields; any other record is a whole field of its own.
FIELD_RECORDS = {("metrics", P.METRICS): "metrics", ("config", P.INFO): "info",
                 ("config", P.CONFIG): "config"}


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are stamped with the running task's identity, which Flower sets."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def sent_fields(reply_type: type[Payload], reply: Message) -> set[str]:
    """The fields of `reply_type` that `reply` carries on the wire; fails on a record
    entry that no field of `reply_type` describes, or one found in the wrong record."""
    assert not reply.has_error(), reply.error.reason
    keys = wire_keys(reply_type)
    travels = {f.name: f.metadata["record"] for f in dataclasses.fields(reply_type)}
    content = reply.content
    sent: set[str] = set()
    for kind, records in (("metrics", content.metric_records),
                          ("config", content.config_records),
                          ("arrays", content.array_records)):
        for name, record in records.items():
            holds = FIELD_RECORDS.get((kind, name))
            if holds is not None:  # a record of fields: every key is one field
                for key in record:
                    assert key in keys, f"{reply_type.__name__}: {name}/{key} is no field"
                    assert travels[keys[key]] == holds, f"{name}/{key} in the wrong record"
                    sent.add(keys[key])
            else:  # a whole record is one field: the arrays, importance scores, a profile
                assert name in keys, f"{reply_type.__name__}: record {name!r} is no field"
                assert travels[keys[name]] in ("arrays", "own-metrics", "own-config")
                sent.add(keys[name])
    return sent


def check_on_the_wire(reply_type: type[Payload], reply: Message, *, simulated: bool
                      ) -> set[str]:
    """`sent_fields`, each listed in the manifest; no simulation-only field unless
    `simulated`. Returns the fields sent."""
    sent = sent_fields(reply_type, reply)
    listed = MANIFEST[reply_type]
    assert sent <= set(listed), f"{reply_type.__name__}: unlisted {sent - set(listed)}"
    assert all(listed[f][0] in KINDS for f in sent)
    if not simulated:
        assert not [f for f in sent if listed[f][0] == "simulation"]
    return sent


def _sent(msg: Message) -> Message:
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink assigns it
    return msg


def _cfg(tmp_path: Path, model: Path, data: Path) -> RunConfig:
    return RunConfig(model=str(model), dataset=str(data), num_silos=2, rounds=2,
                     local_steps=1, batch_size=8, physical_batch_size=8, lora_ranks=(2,),
                     test_size=30, target_epsilon=8.0, out_dir=str(tmp_path))


def _simulated(cfg: RunConfig) -> tuple[SiloSource, dict[str, Any]]:
    """Simulated silo 0, answering one importance query, with a declared profile."""
    simulated = simulated_silos(cfg)

    def source(context: Context) -> Silo:
        silo = simulated(context)
        return dataclasses.replace(silo, profile=PROFILE, policy=dataclasses.replace(
            silo.policy, importance_queries=1))
    return source, {"partition-id": 0}


def _deployed(tmp_path: Path, data: Path) -> tuple[SiloSource, dict[str, Any]]:
    """A silo as `silotune agent` starts it: everything from its node config."""
    node_config: dict[str, Any] = {
        "silo-id": "clinic-a", "data-path": str(data), "state-dir": str(tmp_path / "clinic"),
        "epsilon": 8.0, "delta": 1e-5, "importance-queries": 1.0, "public-size": 100.0,
        **PROFILE.to_node_config()}
    return deployed_silo, node_config


@pytest.mark.parametrize("style", ["simulated", "deployed"])
def test_every_lora_reply_field_on_the_wire_is_in_the_manifest(
        style, tiny_model_dir, toy_dataset_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    source, node_config = (_simulated(cfg) if style == "simulated"
                           else _deployed(tmp_path, toy_dataset_file))
    simulated = style == "simulated"
    assert source(Context(run_id=1, node_id=NODE, node_config=node_config,
                          state=RecordDict(), run_config={})).policy.diagnostics == simulated
    app = build_client_app(source)

    def ask(msg: Message) -> Message:
        return app(_sent(msg), Context(run_id=1, node_id=NODE, node_config=node_config,
                                       state=RecordDict(), run_config={}))

    hello = ask(Hello().to_message(NODE))
    assert check_on_the_wire(HelloReply, hello, simulated=simulated) == {
        "silo_id", "num_examples", "profile"}

    roster = RosterSilo(node_id=NODE, position=0, num_examples=0, rank=2,
                        targets=("q_proj", "v_proj"), batch=cfg.batch_size,
                        physical_batch=cfg.physical_batch_size, precision=cfg.base_precision)
    train = ask(train_message(cfg, 1, roster, SiloPlan(rank=2), GlobalState(), "fed-m"))
    sent = check_on_the_wire(TrainReply, train, simulated=simulated)
    private = {"epsilon", "delta", "epsilon_limit", "noise_multiplier", "ledger_head",
               "ledger_chain", "ledger_key"}
    assert private | {"silo_id", "num_examples", "base_version", "steps", "arrays"} <= sent
    # a simulated silo does send its diagnostics: the check above would see them
    assert ({"worker", "peak_memory"} <= sent) == simulated

    importance = ask(ImportanceQuery(federation_id="fed-m", model=str(tiny_model_dir),
                                     calibration_steps=2, calibration_batch=8,
                                     run_seed=0).to_message(NODE))
    assert check_on_the_wire(ImportanceReply, importance, simulated=simulated) == {
        "num_examples", "max_tokens", "scores"}


def test_every_crosslm_reply_field_on_the_wire_is_in_the_manifest(
        tiny_encoder_dir, toy_dataset_file, tmp_path):
    run = RunConfig(mode="crosslm", slm=str(tiny_encoder_dir), dataset=str(toy_dataset_file),
                    num_silos=1, target_epsilon=8.0, out_dir=str(tmp_path), batch_size=16,
                    slm_steps=4, test_size=30)
    app = build_client_app(simulated_silos(run))

    def ask(msg: Message) -> Message:
        return app(_sent(msg), Context(run_id=7, node_id=NODE,
                                       node_config={"partition-id": 0, "num-partitions": 1},
                                       state=RecordDict(), run_config={}))

    synthetic = [["cardiac valve acute", "heart"], ["rash chronic", "skin"]]
    trained = ask(SlmTrainRequest(
        round=0, slm=str(tiny_encoder_dir), labels=list(TOY_LABELS), synthetic=[],
        slm_steps=4, batch_size=16, learning_rate=0.01, max_grad_norm=1.0,
        target_epsilon=8.0, target_delta=1e-5, planned_rounds=2, run_seed=0,
    ).to_message(NODE))
    assert check_on_the_wire(SlmTrainReply, trained, simulated=True) == {
        "silo_id", "num_examples", "steps", "slm_accuracy", "epsilon", "delta",
        "epsilon_limit", "noise_multiplier", "ledger_head", "ledger_chain", "ledger_key"}
    scored = ask(ScoreRequest(round=1, slm=str(tiny_encoder_dir), labels=list(TOY_LABELS),
                              synthetic=synthetic, private_run=True,
                              run_seed=0).to_message(NODE))
    assert check_on_the_wire(ScoreReply, scored, simulated=True) == {
        "silo_id", "num_examples", "scores", "slm_dp", "ledger_head"}


def test_the_manifest_lists_every_reply_field_once_with_a_kind_and_a_reason():
    for reply_type, listed in MANIFEST.items():
        fields = {f.name for f in dataclasses.fields(reply_type)}
        assert set(listed) == fields, reply_type.__name__
        assert all(kind in KINDS and reason for kind, reason in listed.values())
        assert len(wire_keys(reply_type)) == len(fields)  # no two fields share a key


# -- check_reply ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LossyTrainReply(TrainReply):
    """A train reply with a field nobody decided may leave a silo."""

    train_loss: float | None = dataclasses.field(
        default=None, metadata={"key": "train-loss", "record": "metrics", "allow_inf": False})


def test_a_field_the_manifest_does_not_list_is_refused(monkeypatch):
    lossy = LossyTrainReply(silo_id="s", base_version=0, steps=1, train_loss=0.5)
    assert "train-loss" in lossy.to_content()[P.METRICS]  # it would travel if allowed
    with pytest.raises(UnlistedFieldError, match=r"^LossyTrainReply\.\w+ is not in the release"):
        check_reply(lossy, simulated=True)  # an unlisted reply type: nothing of it leaves
    monkeypatch.setitem(MANIFEST, LossyTrainReply, MANIFEST[TrainReply])
    with pytest.raises(UnlistedFieldError) as err:
        check_reply(lossy, simulated=True)  # its listed fields pass; the extra one does not
    assert str(err.value) == ("LossyTrainReply.train_loss is not in the release manifest "
                              "(silotune/protocol/manifest.py)")
    check_reply(dataclasses.replace(lossy, train_loss=None), simulated=True)


def test_a_deployed_silo_never_sends_simulation_only_fields(tmp_path):
    measured = TrainReply(silo_id="s", base_version=0, steps=1, peak_memory=1 << 20)
    check_reply(measured, simulated=True)
    with pytest.raises(UnlistedFieldError) as err:
        check_reply(measured, simulated=False)
    assert str(err.value) == "TrainReply.peak_memory is sent by simulated silos only"
    with pytest.raises(UnlistedFieldError, match=r"TrainReply\.worker is sent by simulated"):
        check_reply(TrainReply(silo_id="s", base_version=0, steps=1, worker="host-1"),
                    simulated=False)

    silo = Silo(silo_id="s", index=0, state_dir=tmp_path, ledger_path=tmp_path / "l.jsonl",
                load_data=lambda: pytest.fail("no data is needed to reply"),
                policy=SiloPolicy(8.0, 1e-5))  # a deployed silo: diagnostics off
    request = Message(RecordDict(), dst_node_id=NODE, message_type="train")
    with pytest.raises(UnlistedFieldError):
        silo.reply(measured, request)  # refused before it becomes a message
    plain = silo.reply(dataclasses.replace(measured, peak_memory=None), request)
    assert P.PEAK_MEMORY not in plain.content.metric_records[P.METRICS]
