"""CrossLM silo handlers on tiny models: score replies carry scores only, feedback
releases are ledgered at 0 epsilon and pass `silotune audit`, non-DP SLMs are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from silotune.cli import main
from silotune.client.app import build_client_app
from silotune.client.crosslm import slm_path
from silotune.client.silo import SiloPrivacy, SiloPrivacyConfig
from silotune.config import RunConfig
from silotune.ml.crosslm import FeedbackRefusedError
from silotune.privacy.audit import audit_ledger
from silotune.privacy.feedback import check_feedback_entry, record_feedback
from silotune.privacy.ledger import verify_ledger
from silotune.protocol import keys as P
from silotune.protocol.messages import ScoreRequest, SlmTrainRequest
from silotune.server.crosslm import validate_feedback
from silotune.simulations.silos import simulated_silos
from tests.conftest import TOY_LABELS


@pytest.fixture(autouse=True, scope="module")
def _task_identity():
    """Flower stamps new Messages with the running task's ids; act as run 7, node 1."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


SYNTHETIC = [["cardiac valve acute", "heart"], ["asthma of the left", "lung"],
             ["rash chronic", "skin"], ["pleural unspecified", "heart"]]


def _context(silo_index: int = 0) -> Context:
    return Context(run_id=7, node_id=1, node_config={"partition-id": silo_index,
                                                      "num-partitions": 1},
                   state=RecordDict(), run_config={})


def _app(tmp_path: Path, encoder: Path, data: Path, epsilon: float):
    run = RunConfig(mode="crosslm", slm=str(encoder), dataset=str(data), num_silos=1,
                    target_epsilon=epsilon, out_dir=str(tmp_path), batch_size=16,
                    slm_steps=4, test_size=30)
    source = simulated_silos(run)
    silo = source(_context())  # the handlers derive the same silo
    return (build_client_app(source), str(encoder), epsilon), silo, silo.frame


def _train(app, round_: int = 0, synthetic=()) -> Message:
    app, slm, epsilon = app
    ask = SlmTrainRequest(round=round_, slm=slm, labels=list(TOY_LABELS),
                          synthetic=list(synthetic), slm_steps=4, batch_size=16,
                          learning_rate=0.01, max_grad_norm=1.0, target_epsilon=epsilon,
                          target_delta=1e-5, planned_rounds=2, run_seed=0)
    return app(ask.to_message(1), _context())


def _score(app, private_run: bool = True) -> Message:
    app, slm, _ = app
    ask = ScoreRequest(round=1, slm=slm, labels=list(TOY_LABELS), synthetic=SYNTHETIC,
                       private_run=private_run, run_seed=0)
    return app(ask.to_message(1), _context())


@pytest.fixture(scope="module")
def dp_silo(tmp_path_factory, tiny_encoder_dir, toy_dataset_file):
    tmp = tmp_path_factory.mktemp("crosslm-dp")
    app, silo, frame = _app(tmp, tiny_encoder_dir, toy_dataset_file, epsilon=8.0)
    trained = _train(app)
    assert not trained.has_error(), trained.error.reason if trained.has_error() else ""
    scored = _score(app)
    assert not scored.has_error(), scored.error.reason if scored.has_error() else ""
    return app, silo, frame, trained, scored


def test_training_reports_accuracy_and_epsilon(dp_silo):
    _, silo, _, trained, _ = dp_silo
    m = trained.content.metric_records[P.METRICS]
    assert 0.0 <= m[P.SLM_ACCURACY] <= 1.0 and 0.0 < m[P.EPSILON] <= 8.0
    assert slm_path(silo).is_file()


def test_score_reply_carries_scores_only(dp_silo):
    _, _, frame, _, scored = dp_silo
    content = scored.content
    assert not content.array_records  # no weights, no gradients
    assert set(content.metric_records) == {P.METRICS}
    metrics = content.metric_records[P.METRICS]
    assert set(metrics) == {P.SCORES, P.NUM_EXAMPLES, P.SLM_DP}
    scores = metrics[P.SCORES]
    assert len(scores) == len(SYNTHETIC) and all(0.0 <= s <= 1.0 for s in scores)
    assert metrics[P.SLM_DP] == 1 and metrics[P.NUM_EXAMPLES] == len(frame)
    info = content.config_records[P.INFO]
    assert set(content.config_records) == {P.INFO}
    assert set(info) == {P.SILO_ID, P.LEDGER_HEAD}
    strings = [str(v) for v in info.values()]
    texts = set(frame["text"]) | {t for t, _ in SYNTHETIC}
    assert not any(t in s for s in strings for t in texts)  # no private or synthetic text
    assert validate_feedback(scored, len(SYNTHETIC), private_run=True)[0] == scores


def test_feedback_release_is_ledgered_at_zero_epsilon_and_audits(dp_silo, capsys):
    _, silo, _, _, scored = dp_silo
    ledger = silo.ledger_path
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert [e["type"] for e in entries] == ["train", "feedback"]
    train, feedback = entries
    assert feedback["epsilon_cost"] == 0.0 and feedback["epsilon"] == train["epsilon"]
    assert feedback["model_entry_hash"] == train["entry_hash"]
    assert feedback["count"] == len(SYNTHETIC) and "text" not in json.dumps(feedback)
    assert scored.content.config_records[P.INFO][P.LEDGER_HEAD] == feedback["entry_hash"]
    assert verify_ledger(ledger) == []
    audit = audit_ledger(ledger)
    assert audit.ok and audit.feedback_entries == 1 and audit.train_entries == 1
    assert main(["audit", str(ledger)]) == 0
    assert "1 feedback" in capsys.readouterr().out


def test_audit_flags_a_feedback_entry_that_charges_or_hides_budget(tmp_path):
    privacy = SiloPrivacy(SiloPrivacyConfig(
        silo_id="s", target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0,
        ledger_path=tmp_path / "l.jsonl", key_path=tmp_path / "k.pem"))
    frame = pd.DataFrame({"text": ["a"], "label": ["x"]})
    from silotune.privacy.accounting import AccountingStep

    _, train = privacy.record_round(step=AccountingStep(1.0, 0.1, 5), run_id="r", round_=0,
                                    frame=frame, liveness=0.1)
    good = record_feedback(privacy.ledger, silo_id="s", run_id="r", round_=1,
                           request=[["t", "x"]], scores=[0.5])
    problems: list[str] = []
    check_feedback_entry(good, "seq 1", train, problems)
    assert problems == []
    bad = {**good, "epsilon_cost": 0.1, "epsilon": train["epsilon"] * 0.5,
           "model_entry_hash": "0" * 64, "released": "text"}
    check_feedback_entry(bad, "seq 1", train, problems)
    assert [p.split(":")[1].strip() for p in problems] == [
        "released", "epsilon_cost", "model_entry_hash", "epsilon"]
    # signed but wrong: the chain and signature hold, the feedback check does not
    body = {k: v for k, v in bad.items() if k not in (
        "seq", "prev_hash", "ts", "signer_key_id", "signer_public_key", "entry_hash",
        "signature")}
    privacy.ledger.append(body)
    found = verify_ledger(tmp_path / "l.jsonl")
    assert any("seq 2: epsilon_cost" in p for p in found), found
    assert not audit_ledger(tmp_path / "l.jsonl").ok


def test_non_dp_slm_is_refused_in_a_private_run(tmp_path, tiny_encoder_dir, toy_dataset_file):
    app, silo, _ = _app(tmp_path, tiny_encoder_dir, toy_dataset_file, epsilon=math.inf)
    assert not _train(app).has_error()  # a non-private silo trains without DP
    refused = _score(app, private_run=True)
    assert refused.has_error() and "FeedbackRefusedError" in refused.error.reason
    assert not silo.ledger_path.exists()  # nothing released, nothing recorded
    allowed = _score(app, private_run=False)  # the run is marked non-private: allowed
    assert not allowed.has_error()
    assert allowed.content.metric_records[P.METRICS][P.SLM_DP] == 0
    with pytest.raises(FeedbackRefusedError):
        validate_feedback(allowed, len(SYNTHETIC), private_run=True)  # coordinator side
    validate_feedback(allowed, len(SYNTHETIC), private_run=False)


def test_coordinator_rejects_feedback_with_anything_but_scores(dp_silo):
    _, _, _, _, scored = dp_silo
    n = len(SYNTHETIC)
    with_arrays = RecordDict({**scored.content,
                              P.ARRAYS: ArrayRecord([np.zeros(3, np.float32)])})
    with_text = RecordDict({**scored.content, "leak": ConfigRecord({"text": "cardiac"})})
    extra_metric = RecordDict({P.METRICS: MetricRecord({
        **scored.content.metric_records[P.METRICS], "grad-norm": 1.0}),
        P.INFO: scored.content.config_records[P.INFO]})
    for content, match in ((with_arrays, "arrays"), (with_text, "unexpected"),
                           (extra_metric, "unexpected")):
        with pytest.raises(ValueError, match=match):
            validate_feedback(Message(content, reply_to=_score_request()), n, True)
    with pytest.raises(ValueError, match="expected 3"):
        validate_feedback(scored, 3, True)


def _score_request() -> Message:
    return Message(RecordDict(), dst_node_id=1, message_type=ScoreRequest.message_type)
