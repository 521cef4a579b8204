"""The silo side of CrossLM: SLM training ("train.slm") and feedback ("query.score").

Thin Flower handlers over silotune/ml/slm.py. The SLM's trainable weights persist in the
silo's state folder between messages (``slm.pt``) with a flag saying whether they were
trained with DP-SGD. A score reply carries only the scores p_SLM(y_j | x_j), the silo's
example count and that flag: no text, no weights, no gradients. In a private run, a silo
records every score release in its signed ledger as post-processing (0 epsilon) and
refuses to score with an SLM not trained with DP.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from silotune.client.local import Silo, SiloSource
from silotune.client.spend import Request, private_training, refusing, spent_fields
from silotune.files import atomic_write_bytes
from silotune.ml.assets import resolve_slm
from silotune.ml.crosslm import check_feedback_allowed
from silotune.ml.dp_sgd import DPConfig
from silotune.ml.slm import (
    SLMClassifier,
    SLMTrainConfig,
    labelled_dataset,
    load_slm,
    predict_proba,
    train_slm,
    trainable_state,
)
from silotune.privacy.feedback import record_feedback
from silotune.protocol import keys as P
from silotune.protocol.messages import ScoreReply, ScoreRequest, SlmTrainReply, SlmTrainRequest


def register(app: ClientApp, source: SiloSource) -> None:
    """Add the CrossLM handlers to `app`."""
    app.train(P.TRAIN_SLM)(refusing(source, "train its SLM", _train))
    app.query(P.QUERY_SCORE)(refusing(source, "score", _score))


def slm_path(silo: Silo) -> Path:
    """Where the silo keeps its SLM's trainable weights between messages."""
    return silo.state_dir / "slm.pt"


def _load(silo: Silo, slm: str, labels: list[str], run_id: str, seed: int
          ) -> tuple[SLMClassifier, Any, dict[str, Any] | None]:
    """The silo's SLM as this run last left it (a new run starts from a fresh head)."""
    path = slm_path(silo)
    stored = torch.load(path, weights_only=True) if path.is_file() else None
    if stored is not None and stored["run_id"] != run_id:
        stored = None
    if stored is not None and list(stored["labels"]) != labels:
        raise ValueError(f"the stored SLM at {path} was trained for other labels; delete it")
    model, tok = load_slm(resolve_slm(slm), len(labels), seed=seed * 1009 + silo.index,
                          state=stored["state"] if stored is not None else None)
    return model, tok, stored


def _train(msg: Message, context: Context, silo: Silo) -> Message:
    ask = SlmTrainRequest.from_message(msg)
    if silo.held_out is None:
        raise ValueError("CrossLM mode runs in simulation only for now: a deployed silo "
                         "has no held-out split to report SLM accuracy on")
    privacy = silo.privacy(ask.max_grad_norm, ask.target_epsilon)
    if privacy.private:  # refused before the data is read
        silo.policy.check_train(ask.target_epsilon, ask.target_delta,
                                ask.planned_rounds * ask.slm_steps)
        silo.policy.check_per_row_release("CrossLM small-model training")
    run_id = str(context.run_id)
    model, tok, _ = _load(silo, ask.slm, ask.labels, run_id, ask.run_seed)
    frame = silo.frame
    private = labelled_dataset(tok, list(frame["text"]), list(frame["label"]), ask.labels)
    synth = (labelled_dataset(tok, [t for t, _ in ask.synthetic],
                              [y for _, y in ask.synthetic], ask.labels)
             if ask.synthetic else None)
    train_cfg = SLMTrainConfig(
        steps=ask.slm_steps, batch_size=ask.batch_size, learning_rate=ask.learning_rate,
        synthetic_steps=ask.slm_steps if synth is not None else 0,
        seed=ask.run_seed * 100_003 + ask.round * 1009 + silo.index)

    def train(dp: DPConfig | None) -> float:
        return train_slm(model, private, synth, train_cfg, dp)  # LivenessError if frozen

    if privacy.private:
        request = Request(run_id, ask.round, ask.target_epsilon, ask.target_delta,
                          ask.batch_size, ask.slm_steps, ask.planned_rounds * ask.slm_steps,
                          ledger_since=ask.ledger_since)
        _, spent = private_training(silo, privacy, request, frame, train)
    else:
        spent = None
        train(None)
    buffer = io.BytesIO()
    torch.save({"state": trainable_state(model), "labels": ask.labels,
                "dp": privacy.private, "run_id": run_id}, buffer)
    atomic_write_bytes(slm_path(silo), buffer.getvalue())
    test = silo.held_out()
    probs = predict_proba(model, tok, list(test["text"]))
    index = {lab: j for j, lab in enumerate(ask.labels)}
    gold = np.array([index[g] for g in test["label"]])
    return silo.reply(SlmTrainReply(silo_id=silo.silo_id, num_examples=silo.declared_size(),
                                    steps=ask.slm_steps,
                                    slm_accuracy=float((probs.argmax(1) == gold).mean()),
                                    **spent_fields(spent)), msg)


def _score(msg: Message, context: Context, silo: Silo) -> Message:
    ask = ScoreRequest.from_message(msg)
    run_id = str(context.run_id)
    model, tok, stored = _load(silo, ask.slm, ask.labels, run_id, ask.run_seed)
    if stored is None:
        raise ValueError("this silo has no trained SLM yet; send train.slm first")
    dp_trained = bool(stored["dp"])
    check_feedback_allowed(dp_trained, ask.private_run)
    index = {lab: j for j, lab in enumerate(ask.labels)}
    probs = predict_proba(model, tok, [t for t, _ in ask.synthetic])
    scores = [float(probs[j, index[y]]) for j, (_, y) in enumerate(ask.synthetic)]
    head = None
    if dp_trained:  # record the release (0 epsilon: post-processing) before it leaves
        entry = record_feedback(silo.ledger(), silo_id=silo.silo_id, run_id=run_id,
                                round_=ask.round, request=ask.synthetic, scores=scores)
        head = str(entry["entry_hash"])
    return silo.reply(ScoreReply(silo_id=silo.silo_id, scores=scores,
                                 num_examples=silo.declared_size(), slm_dp=dp_trained,
                                 ledger_head=head), msg)
