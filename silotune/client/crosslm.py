"""The silo side of CrossLM: SLM training ("train.slm") and feedback ("query.score").

Thin Flower handlers over silotune/slm.py. The SLM's trainable weights persist on the
silo's disk between messages (``<out>/silos/<silo>/slm.pt``) with a flag saying whether
they were trained with DP-SGD. A score reply carries only the scores
p_SLM(y_j | x_j), the silo's example count and that flag: no text, no weights, no
gradients. In a private run, a silo records every score release in its signed ledger as
post-processing (0 epsilon) and refuses to score with an SLM not trained with DP.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from silotune.client.silo import SiloPrivacy
from silotune.config import RunConfig
from silotune.ml.assets import resolve_slm
from silotune.ml.crosslm import FeedbackRefusedError, check_feedback_allowed
from silotune.ml.slm import (
    SLMClassifier,
    SLMTrainConfig,
    labelled_dataset,
    load_slm,
    predict_proba,
    train_slm,
    trainable_state,
)
from silotune.ml.train import DPConfig, LivenessError, sample_rate_for
from silotune.privacy.accounting import AccountingStep, BudgetExhausted
from silotune.privacy.feedback import record_feedback
from silotune.protocol import keys as P

if TYPE_CHECKING:
    from silotune.client.app import Silo

log = logging.getLogger(__name__)

_REFUSALS = (BudgetExhausted, LivenessError, FeedbackRefusedError, ValueError)


def register_crosslm(app: ClientApp, preset: RunConfig | None) -> None:
    """Add the CrossLM handlers to `app` (``preset`` as in `build_client_app`)."""
    from silotune.client.app import silo_from_context  # app.py registers us: import late

    def refusing(what: str, handle: Callable[[Message, Context, Silo], Message]
                 ) -> Callable[[Message, Context], Message]:
        """`handle`, answering a refusal (budget, liveness, non-DP SLM, bad input) with an
        error reply that names it instead of failing the ClientApp."""
        def handler(msg: Message, context: Context) -> Message:
            silo = silo_from_context(context, preset)
            try:
                return handle(msg, context, silo)
            except _REFUSALS as err:
                log.warning("%s refused to %s: %s", silo.silo_id, what, err)
                return Message(Error(code=P.ERROR_REFUSED,
                                     reason=f"{type(err).__name__}: {err}"), reply_to=msg)
        return handler

    app.train(P.TRAIN_SLM)(refusing("train its SLM", _train))
    app.query(P.QUERY_SCORE)(refusing("score", _score))


def slm_path(silo: Silo) -> Path:
    """Where the silo keeps its SLM's trainable weights between messages."""
    return Path(silo.run.out_dir) / "silos" / silo.silo_id / "slm.pt"


def _load(silo: Silo, labels: list[str], run_id: str
          ) -> tuple[SLMClassifier, Any, dict[str, Any] | None]:
    """The silo's SLM as this run last left it (a new run starts from a fresh head)."""
    path = slm_path(silo)
    stored = torch.load(path, weights_only=True) if path.is_file() else None
    if stored is not None and stored["run_id"] != run_id:
        stored = None
    if stored is not None and list(stored["labels"]) != labels:
        raise ValueError(f"the stored SLM at {path} was trained for other labels; delete it")
    model, tok = load_slm(resolve_slm(silo.run.slm), len(labels),
                          seed=silo.run.seed * 1009 + silo.index,
                          state=stored["state"] if stored is not None else None)
    return model, tok, stored


def _train(msg: Message, context: Context, silo: Silo) -> Message:
    cfg = msg.content.config_records[P.CONFIG]
    round_ = P.as_int(cfg[P.ROUND], P.ROUND)
    labels = [str(x) for x in json.loads(str(cfg[P.LABELS]))]
    synthetic = json.loads(str(cfg[P.SYNTHETIC]))
    model, tok, _ = _load(silo, labels, str(context.run_id))
    frame = silo.frame
    private = labelled_dataset(tok, list(frame["text"]), list(frame["label"]), labels)
    synth = (labelled_dataset(tok, [t for t, _ in synthetic], [y for _, y in synthetic], labels)
             if synthetic else None)
    steps = P.as_int(cfg[P.SLM_STEPS], P.SLM_STEPS)
    batch = P.as_int(cfg[P.BATCH_SIZE], P.BATCH_SIZE)
    train_cfg = SLMTrainConfig(steps=steps, batch_size=batch,
                               learning_rate=P.as_float(cfg[P.LEARNING_RATE], P.LEARNING_RATE),
                               synthetic_steps=steps if synth is not None else 0,
                               seed=silo.run.seed * 100_003 + round_ * 1009 + silo.index)
    metrics: dict[str, int | float | list[int] | list[float]] = {
        P.NUM_EXAMPLES: len(private), P.STEPS: steps}
    info = ConfigRecord({P.SILO_ID: silo.silo_id})
    if silo.privacy.private:
        privacy = SiloPrivacy(silo.privacy)
        q = sample_rate_for(len(private), batch)
        planned = P.as_int(cfg[P.PLANNED_ROUNDS], P.PLANNED_ROUNDS) * steps
        sigma = privacy.noise_multiplier(str(context.run_id), q, planned)
        step = AccountingStep(noise_multiplier=sigma, sample_rate=q, steps=steps)
        privacy.check_round(step)  # refuse before any training
        before = trainable_state(model)
        loss = train_slm(model, private, synth, train_cfg,
                         DPConfig(noise_multiplier=sigma,
                                  max_grad_norm=silo.privacy.max_grad_norm))
        moved = max(float((v - before[k]).abs().max()) for k, v in trainable_state(model).items())
        report, entry = privacy.record_round(step=step, run_id=str(context.run_id),
                                             round_=round_, frame=frame, liveness=moved)
        metrics.update({P.EPSILON: report.epsilon, P.DELTA: silo.privacy.delta,
                        P.EPSILON_LIMIT: silo.privacy.target_epsilon})
        info[P.LEDGER_HEAD] = str(entry["entry_hash"])
    else:
        loss = train_slm(model, private, synth, train_cfg, dp=None)
    path = slm_path(silo)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": trainable_state(model), "labels": labels,
                "dp": silo.privacy.private, "run_id": str(context.run_id)}, tmp)
    tmp.replace(path)
    if silo.task is None:
        raise ValueError("CrossLM mode runs in simulation only for now: a deployed silo "
                         "has no held-out split to report SLM accuracy on")
    test = silo.task.test
    probs = predict_proba(model, tok, list(test["text"]))
    index = {lab: j for j, lab in enumerate(labels)}
    gold = np.array([index[g] for g in test["label"]])
    metrics.update({P.TRAIN_LOSS: loss,
                    P.SLM_ACCURACY: float((probs.argmax(1) == gold).mean())})
    return Message(RecordDict({P.METRICS: MetricRecord(metrics), P.INFO: info}), reply_to=msg)


def _score(msg: Message, context: Context, silo: Silo) -> Message:
    cfg = msg.content.config_records[P.CONFIG]
    round_ = P.as_int(cfg[P.ROUND], P.ROUND)
    private_run = bool(P.as_int(cfg[P.PRIVATE_RUN], P.PRIVATE_RUN))
    labels = [str(x) for x in json.loads(str(cfg[P.LABELS]))]
    synthetic = json.loads(str(cfg[P.SYNTHETIC]))
    model, tok, stored = _load(silo, labels, str(context.run_id))
    if stored is None:
        raise ValueError("this silo has no trained SLM yet; send train.slm first")
    dp_trained = bool(stored["dp"])
    check_feedback_allowed(dp_trained, private_run)
    index = {lab: j for j, lab in enumerate(labels)}
    probs = predict_proba(model, tok, [t for t, _ in synthetic])
    scores = [float(probs[j, index[y]]) for j, (_, y) in enumerate(synthetic)]
    info = ConfigRecord({P.SILO_ID: silo.silo_id})
    if dp_trained:  # record the release (0 epsilon: post-processing) before it leaves
        entry = record_feedback(SiloPrivacy(silo.privacy).ledger, silo_id=silo.silo_id,
                                run_id=str(context.run_id), round_=round_,
                                request=synthetic, scores=scores)
        info[P.LEDGER_HEAD] = str(entry["entry_hash"])
    metrics = MetricRecord({P.SCORES: scores, P.NUM_EXAMPLES: len(silo.frame),
                            P.SLM_DP: int(dp_trained)})
    return Message(RecordDict({P.METRICS: metrics, P.INFO: info}), reply_to=msg)
