"""The silo's side of FedPipe: its answer to the importance query, if its policy allows.

The importance query asks a silo to score every candidate weight matrix on a few
calibration batches of its own data (AdaLoRA-style sensitivity with smoothing,
`silotune.planning.sensitivity`). A private silo answers only when its policy opts in
(``importance-queries``, at most one per federation), and then with a DP statistic:
per-example scores clipped, Poisson batches drawn from the silo's secret randomness,
Gaussian noise added, and the release charged to its ledger as an ``importance`` entry
(counted in its cumulative epsilon). The reply carries one number per matrix and the
public truncation length; no data, no gradients.
"""

from __future__ import annotations

import secrets

import torch
from flwr.app import Context, Message

from silotune.client.base_store import STORE
from silotune.client.local import Silo
from silotune.client.silo import SiloPrivacy
from silotune.client.spend import state_lock
from silotune.ml.assets import resolve_model
from silotune.ml.lm import encode_frame
from silotune.planning.sensitivity import SiloImportance, dp_silo_importance, silo_importance
from silotune.privacy.accounting import AccountingStep
from silotune.protocol.messages import ImportanceQuery, ImportanceReply

IMPORTANCE_CLIP = 1.0  # L2 bound of one example's vector of per-matrix scores


def importance_reply(msg: Message, context: Context, silo: Silo) -> Message:
    """Score the candidate matrices of the (unmerged) base on this silo's data."""
    ask = ImportanceQuery.from_message(msg)
    if not silo.policy.private:  # a non-private silo (its operator's choice): exact scores
        base, tok = STORE.get(str(resolve_model(ask.model)), str(context.run_id), [], [])
        answer = silo_importance(base, encode_frame(tok, silo.frame), int(tok.pad_token_id),
                                 batch_size=ask.calibration_batch,
                                 steps=ask.calibration_steps, seed=ask.run_seed)
    else:
        answer = _private_importance(ask, context, silo)
    return silo.reply(ImportanceReply(num_examples=silo.declared_size(),
                                      max_tokens=answer.max_tokens, scores=answer.scores), msg)


def _private_importance(ask: ImportanceQuery, context: Context, silo: Silo
                        ) -> SiloImportance:
    """The DP answer: the policy is checked before the data is read, the spend checked
    against the budget and recorded in the ledger before scoring (write-ahead)."""
    with state_lock(silo.state_dir):
        budget = SiloPrivacy(silo.privacy(IMPORTANCE_CLIP, silo.policy.epsilon))
        done = [e for e in budget.ledger.entries() if e.get("type") == "importance"]
        silo.policy.check_importance(
            len(done), sum(e.get("run_id") == ask.federation_id for e in done),
            ask.calibration_batch)
        frame = silo.frame
        q = min(1.0, ask.calibration_batch / len(frame))
        step = AccountingStep(silo.policy.importance_noise, q, ask.calibration_steps)
        budget.check_round(step)  # refuse before scoring
        seed = silo.noise_seed(0)  # None, always outside simulations: a secret draw
        budget.record_round(step=step, run_id=ask.federation_id, round_=0, frame=frame,
                            kind="importance", noise="os" if seed is None else "seeded")
        base, tok = STORE.get(str(resolve_model(ask.model)), str(context.run_id), [], [])
        sampling = torch.Generator().manual_seed(secrets.randbits(63) if seed is None
                                                 else seed)
        return dp_silo_importance(
            base, encode_frame(tok, frame), int(tok.pad_token_id),
            batch_size=ask.calibration_batch, steps=ask.calibration_steps,
            clip=IMPORTANCE_CLIP, noise_multiplier=silo.policy.importance_noise,
            generator=sampling)
