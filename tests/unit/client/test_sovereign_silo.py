"""A sovereign silo on the tiny model, its ClientApp called directly (no Flower engine).

Its own policy refuses looser requests before the data is read; it answers importance
queries only as its policy allows and charges them to its ledger; a run spends at most
the run's target under a larger lifetime policy; two concurrent requests for one round
spend once; DP-SGD with an expected batch of one takes noise-only steps on empty Poisson
draws; and error replies name the kind of failure and a log reference, never local facts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import threading
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from silotune.client.app import build_client_app
from silotune.client.local import SiloSource
from silotune.client.policy import SiloPolicy
from silotune.config import RunConfig
from silotune.ml.dp_sgd import DPConfig
from silotune.ml.lm import encode_frame, load_model
from silotune.ml.train import LocalTrainConfig, train_local
from silotune.privacy.accounting import AccountingStep, compute_epsilon, compute_epsilon_rdp
from silotune.privacy.ledger import load_or_create_signing_key, read_entries, verify_ledger
from silotune.protocol import keys as P
from silotune.protocol.codec import from_record
from silotune.protocol.messages import ImportanceQuery, ImportanceReply, TrainInstruction
from silotune.server.exchange import train_message
from silotune.server.roster import Silo as RosterSilo
from silotune.server.state import GlobalState
from silotune.simulations.silos import simulated_silos
from silotune.strategies.base import SiloPlan
from tests.conftest import toy_frame

NODE = 7
FEDERATION = "fed-sovereign"
POLICY = SiloPolicy(epsilon=8.0, delta=1e-5, max_steps=10)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are stamped with the running task's identity, which Flower sets."""
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _cfg(tmp_path, model, data, **changes) -> RunConfig:
    cfg = RunConfig(model=str(model), dataset=str(data), num_silos=2, rounds=2,
                    local_steps=1, batch_size=8, physical_batch_size=8, lora_ranks=(2,),
                    test_size=30, target_epsilon=8.0, out_dir=str(tmp_path))
    return dataclasses.replace(cfg, **changes)


def _source(cfg: RunConfig, policy: SiloPolicy,
            load_data: Callable[[], pd.DataFrame] | None = None,
            loads: list[int] | None = None) -> SiloSource:
    """Simulated silo 0 of `cfg` with its operator's `policy` (and, optionally, its own
    data loader); every read of its data is counted in `loads`."""
    simulated = simulated_silos(cfg)

    def source(context: Context):
        silo = simulated(context)
        read = load_data or silo.load_data

        def counted() -> pd.DataFrame:
            if loads is not None:
                loads.append(1)
            return read()

        return dataclasses.replace(silo, policy=policy, load_data=counted)
    return source


def _context(run_id: int = 1) -> Context:
    return Context(run_id=run_id, node_id=NODE, node_config={"partition-id": 0},
                   state=RecordDict(), run_config={})


def _sent(msg: Message) -> Message:
    msg.metadata.__dict__["_message_id"] = msg.object_id  # as the SuperLink assigns it
    return msg


def _train_msg(cfg: RunConfig, round_: int = 1, **changes) -> Message:
    """The coordinator's train message for round `round_`, with `changes` to its fields."""
    roster = RosterSilo(node_id=NODE, position=0, num_examples=0, rank=2,
                        targets=("q_proj", "v_proj"), batch=cfg.batch_size,
                        physical_batch=cfg.physical_batch_size, precision=cfg.base_precision)
    msg = train_message(cfg, round_, roster, SiloPlan(rank=2), GlobalState(), FEDERATION)
    if changes:
        ask = dataclasses.replace(TrainInstruction.from_message(msg), **changes)
        msg = ask.to_message(NODE, ask.wire_dtype)
    return _sent(msg)


def _importance_msg(model, federation: str = FEDERATION, batch: int = 8) -> Message:
    return _sent(ImportanceQuery(federation_id=federation, model=str(model),
                                 calibration_steps=2, calibration_batch=batch,
                                 run_seed=0).to_message(NODE))


def _reason(reply: Message) -> str:
    return str(reply.error.reason) if reply.has_error() else ""


# -- 1. the silo's own policy ------------------------------------------------------------
@pytest.mark.parametrize(("changes", "named"), [
    ({"target_epsilon": math.inf}, "target epsilon inf"),
    ({"target_delta": 0.05}, "target delta 0.05"),
    ({"local_steps": 3, "planned_rounds": 4}, "plans 12 DP-SGD steps"),
], ids=["epsilon-inf", "delta-0.05", "12-steps"])
def test_a_request_looser_than_the_policy_is_refused_before_the_data_is_read(
        changes, named, tiny_model_dir, toy_dataset_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    loads: list[int] = []
    source = _source(cfg, POLICY, loads=loads)
    silo = source(_context())
    reply = build_client_app(source)(_train_msg(cfg, **changes), _context())
    assert reply.has_error()
    assert reply.error.code == P.ERROR_POLICY, _reason(reply)
    assert _reason(reply).startswith("PolicyRefusalError: ") and named in _reason(reply)
    assert not silo.ledger_path.exists()  # nothing spent
    assert list(silo.state_dir.glob("last-reply.*")) == []  # nothing trained
    assert loads == []  # the data was never read


def test_a_request_at_the_policys_limits_trains(tiny_model_dir, toy_dataset_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    source = _source(cfg, POLICY)
    silo = source(_context())
    # epsilon 8, delta 1e-5 and 5 x 2 = 10 steps: exactly what the policy allows
    reply = build_client_app(source)(_train_msg(cfg, local_steps=5, planned_rounds=2),
                                     _context())
    assert not reply.has_error(), _reason(reply)
    entries = read_entries(silo.ledger_path)
    assert [(e["type"], e["steps_this_entry"]) for e in entries] == [("train", 5)]
    assert 0.0 < entries[0]["epsilon"] <= POLICY.epsilon
    assert sorted(p.name for p in silo.state_dir.glob("last-reply.*")) == [
        "last-reply.json", "last-reply.npz"]


# -- 2. importance queries ---------------------------------------------------------------
def test_importance_is_answered_only_as_the_policy_allows_and_charged_to_the_ledger(
        tiny_model_dir, toy_dataset_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    closed = _source(cfg, SiloPolicy(8.0, 1e-5, importance_queries=0))
    silo = closed(_context())
    refused = build_client_app(closed)(_importance_msg(tiny_model_dir), _context())
    assert refused.has_error() and refused.error.code == P.ERROR_POLICY, _reason(refused)
    assert "answers at most 0 importance queries" in _reason(refused)
    assert not silo.ledger_path.exists()

    policy = SiloPolicy(8.0, 1e-5, importance_queries=1)
    app = build_client_app(_source(cfg, policy))  # the same silo, its operator opted in
    tiny = app(_importance_msg(tiny_model_dir, batch=1), _context())  # a batch of one record
    assert tiny.has_error() and tiny.error.code == P.ERROR_POLICY, _reason(tiny)
    assert "batches of at least 8" in _reason(tiny) and not silo.ledger_path.exists()
    answered = app(_importance_msg(tiny_model_dir), _context())
    assert not answered.has_error(), _reason(answered)
    reply = ImportanceReply.from_message(answered)
    assert reply.scores and all(math.isfinite(v) for v in reply.scores.values())

    entries = read_entries(silo.ledger_path)
    assert [e["type"] for e in entries] == ["importance"]
    entry, n = entries[0], len(silo.frame)
    history = [AccountingStep.from_dict(d) for d in entry["accounting_history"]]
    # what was charged: the policy's sigma, q = calibration batch / n, calibration steps
    assert history == [AccountingStep(policy.importance_noise, 8 / n, 2)]
    assert entry["delta"] == policy.delta
    assert entry["epsilon"] == pytest.approx(compute_epsilon(history, policy.delta).epsilon,
                                             rel=1e-9)
    assert 0.0 < entry["epsilon"] <= compute_epsilon_rdp(history, policy.delta) + 1e-9
    assert verify_ledger(silo.ledger_path) == []

    for federation in (FEDERATION, "fed-another"):  # its one lifetime query is spent
        again = app(_importance_msg(tiny_model_dir, federation), _context())
        assert again.has_error() and again.error.code == P.ERROR_POLICY, _reason(again)
        assert "has answered 1" in _reason(again)
    assert len(read_entries(silo.ledger_path)) == 1


def test_a_refused_importance_query_never_reads_the_data(tiny_model_dir, toy_dataset_file,
                                                        tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    loads: list[int] = []
    app = build_client_app(_source(cfg, SiloPolicy(8.0, 1e-5), loads=loads))
    refused = app(_importance_msg(tiny_model_dir), _context())
    assert refused.has_error() and refused.error.code == P.ERROR_POLICY, _reason(refused)
    assert loads == []


# -- 3. a run's own budget ---------------------------------------------------------------
def test_a_run_spends_at_most_its_target_under_a_larger_lifetime_policy(
        tiny_model_dir, toy_dataset_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file, rounds=2, local_steps=2)
    source = _source(cfg, SiloPolicy(200.0, 1e-5))
    silo = source(_context())
    app = build_client_app(source)
    replies = [app(_train_msg(cfg, round_), _context()) for round_ in (1, 2)]
    assert [_reason(r) for r in replies] == ["", ""]
    entries = read_entries(silo.ledger_path)
    assert [(e["type"], e["run_id"], e["round"]) for e in entries] == [
        ("train", FEDERATION, 1), ("train", FEDERATION, 2)]
    assert entries[0]["noise_multiplier"] == entries[1]["noise_multiplier"]  # once per run
    spent = entries[-1]["epsilon"]
    # the run's target, not the silo's lifetime limit, set sigma for the whole run
    assert 0.9 * cfg.target_epsilon < spent <= cfg.target_epsilon + 1e-9
    assert entries[-1]["epsilon_limit"] == 200.0
    metrics = replies[-1].content.metric_records[P.METRICS]
    assert metrics[P.EPSILON] == pytest.approx(spent)
    assert metrics[P.EPSILON_LIMIT] == 200.0
    assert verify_ledger(silo.ledger_path) == []


# -- 4. one spend per round, even when asked twice at once -------------------------------
def test_two_concurrent_requests_for_one_round_spend_once(tiny_model_dir, toy_dataset_file,
                                                          tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    simulated = _source(cfg, POLICY)
    silo = simulated(_context())
    silo.ledger()  # its signing key exists (a race creating it: the test below)
    together = threading.Barrier(2, timeout=60)

    def source(context: Context):
        found = simulated(context)
        together.wait()  # both requests enter the handler at the same moment
        return found

    app = build_client_app(source)
    msg = _train_msg(cfg)
    replies: list[Message | None] = [None, None]
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            replies[i] = app(msg, _context())
        except BaseException as err:  # reported by the test
            errors.append(err)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and all(r is not None for r in replies), errors
    entries = read_entries(silo.ledger_path)
    assert [(e["type"], e["run_id"], e["round"]) for e in entries] == [
        ("train", FEDERATION, 1)]
    assert verify_ledger(silo.ledger_path) == []
    assert entries[0]["epsilon"] <= POLICY.epsilon
    answered = [r for r in replies if r is not None and not r.has_error()]
    refused = [r for r in replies if r is not None and r.has_error()]
    assert answered, [_reason(r) for r in refused]
    if refused:  # it reached the spend lock after the first had spent: refused, not trained
        assert refused[0].error.code == P.ERROR_REFUSED
        assert "already in this silo's ledger" in _reason(refused[0])
    else:  # it came after the reply was kept: the kept reply, sent again
        first, again = (from_record(r.content.array_records[P.ARRAYS]) for r in answered)
        assert sorted(first) == sorted(again)
        assert all(np.array_equal(first[k], again[k]) for k in first)


def test_two_threads_creating_the_signing_key_at_once_both_get_it(tmp_path, monkeypatch):
    path = tmp_path / "state" / "ledger-signing-key.pem"
    both_checked = threading.Barrier(2, timeout=10)
    collided = threading.Event()
    real_generate, real_open, real_fsync = Ed25519PrivateKey.generate, os.open, os.fsync

    def generate() -> Ed25519PrivateKey:
        both_checked.wait()  # both threads found no key and make one
        return real_generate()

    def open_(file, flags, *args, **kwargs):
        try:
            return real_open(file, flags, *args, **kwargs)
        except FileExistsError:
            collided.set()
            raise

    def fsync(fd: int) -> None:
        collided.wait(timeout=2)  # the first writer is still writing its temporary file
        real_fsync(fd)

    monkeypatch.setattr(Ed25519PrivateKey, "generate", staticmethod(generate))
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "fsync", fsync)
    keys: list[bytes] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            key = load_or_create_signing_key(path)
            keys.append(key.public_key().public_bytes_raw())
        except BaseException as err:  # reported by the test
            errors.append(err)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == [] and len(keys) == 2 and keys[0] == keys[1]


# -- 5. an expected batch of one ---------------------------------------------------------
class _EmptyDraws:
    """An optimizer hook counting the steps taken on an empty Poisson draw."""

    def __init__(self) -> None:
        self.sample_rate = 0.0
        self.steps = 0
        self.empty = 0

    def attach(self, optimizer, sample_rate: float) -> None:
        self.sample_rate = sample_rate
        step, first = optimizer.step, optimizer.params[0]

        def counted(*args, **kwargs):
            drawn = first.grad_sample
            self.steps += 1
            self.empty += drawn is None or len(drawn) == 0
            return step(*args, **kwargs)

        optimizer.step = counted


def test_dp_sgd_with_an_expected_batch_of_one_takes_noise_only_steps(tiny_model_dir):
    base, tok = load_model(tiny_model_dir)
    examples = encode_frame(tok, toy_frame(12))
    cfg = LocalTrainConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"), local_steps=8,
                           batch_size=1, physical_batch_size=1, learning_rate=0.01,
                           init_seed=0)
    hook = _EmptyDraws()
    # a seeded draw (a simulation's reproducible noise) whose 8 batches include empty ones
    result = train_local(base, examples, int(tok.pad_token_id), cfg,
                         DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=0),
                         hook=hook)
    assert result.steps == 8
    assert result.sample_rate == hook.sample_rate == pytest.approx(1 / 12)
    assert hook.empty >= 1  # noise-only steps were taken
    assert result.liveness > 0.0
    assert all(np.isfinite(v).all() for v in result.adapter.values())


# -- 6. error replies carry no local facts ------------------------------------------------
def test_an_error_reply_names_the_kind_and_a_log_reference_not_local_facts(
        tiny_model_dir, toy_dataset_file, tmp_path, caplog):
    secret = tmp_path / "secret.csv"

    def unreadable() -> pd.DataFrame:
        raise ValueError(f"cannot read {secret}")

    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    source = _source(cfg, SiloPolicy(8.0, 1e-5, importance_queries=1), load_data=unreadable)
    silo = source(_context())
    app = build_client_app(source)
    for msg, what in ((_train_msg(cfg), "train"),
                      (_importance_msg(tiny_model_dir), "score importance")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="silotune.client.spend"):
            reply = app(msg, _context())
        assert reply.has_error() and reply.error.code == P.ERROR_REFUSED
        reason = _reason(reply)
        assert str(tmp_path) not in reason and "secret.csv" not in reason
        assert reason.startswith(f"ValueError while trying to {what}; ")
        ref = re.search(r"ref ([0-9a-f]{8})$", reason)
        assert ref is not None, reason
        # the details stay in the silo's own log, under the same reference
        logged = [r.getMessage() for r in caplog.records if ref.group(1) in r.getMessage()]
        assert len(logged) == 1 and str(secret) in logged[0]
    assert not silo.ledger_path.exists()


def test_an_unexpected_error_is_reported_by_kind_too(tiny_model_dir, toy_dataset_file,
                                                     tmp_path):
    secret = tmp_path / "secret.csv"

    def broken() -> pd.DataFrame:
        raise RuntimeError(f"cannot read {secret}")

    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    reply = build_client_app(_source(cfg, POLICY, load_data=broken))(_train_msg(cfg),
                                                                     _context())
    assert reply.has_error() and reply.error.code == P.ERROR_REFUSED
    assert str(tmp_path) not in _reason(reply) and "ref " in _reason(reply)


def test_a_missing_rounds_reply_does_not_name_the_silos_folders(
        tiny_model_dir, toy_dataset_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    # the coordinator believes the silo holds global round 1; the silo never received it
    msg = _train_msg(cfg, round_=2, base_fingerprints=["0" * 64], first_sent_round=2,
                     update_scales={"1": 1.0})
    reply = build_client_app(_source(cfg, POLICY))(msg, _context())
    assert reply.has_error() and reply.error.code == P.ERROR_MISSING_ROUNDS, _reason(reply)
    assert "[1]" in _reason(reply)  # the rounds it lacks: the coordinator resends them
    assert str(tmp_path) not in _reason(reply)


def test_a_round_that_fails_after_training_began_records_its_spend_and_says_so(
        tiny_model_dir, toy_dataset_file, tmp_path, monkeypatch):
    """The data was touched, so the budget was spent: the ledger records it (a `failed`
    entry, still audited) and the reply says so, without the failure's own text."""
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    source = _source(cfg, POLICY)
    app = build_client_app(source)
    secret = f"{tmp_path}/private/notes.csv"

    def crash(*_args, **_kwargs):
        raise RuntimeError(f"could not read {secret}")

    monkeypatch.setattr("silotune.client.training.train_local", crash)
    reply = app(_train_msg(cfg), _context())
    assert reply.has_error() and reply.error.code == P.ERROR_REFUSED
    reason = str(reply.error.reason)
    assert "spend is recorded" in reason and secret not in reason
    silo = source(_context())
    entries = read_entries(silo.ledger_path)
    assert [e["type"] for e in entries] == ["train"]  # written ahead of the training
    assert entries[0]["epsilon"] > 0 and verify_ledger(silo.ledger_path) == []
