"""The silo's side of FedPipe: its answer to the importance query.

The importance query asks a silo to score every candidate weight matrix on a small
calibration batch of its own data (`silotune.planning.sensitivity`, AdaLoRA sensitivity
with smoothing). The reply carries only one number per matrix and the length of the
silo's longest example; no data, no gradients. These scores are not covered by the
DP-SGD guarantee (see README, "Automatic per-silo configuration").
"""

from __future__ import annotations

from flwr.app import Context, Message

from silotune.client.base_store import STORE
from silotune.client.local import Silo
from silotune.ml.assets import resolve_model
from silotune.ml.lm import encode_frame
from silotune.planning.sensitivity import silo_importance
from silotune.protocol.messages import ImportanceQuery, ImportanceReply


def importance_reply(msg: Message, context: Context, silo: Silo) -> Message:
    """Score the candidate matrices of the (unmerged) base on this silo's data."""
    ask = ImportanceQuery.from_message(msg)
    base, tok = STORE.get(str(resolve_model(ask.model)), str(context.run_id), [], [])
    answer = silo_importance(base, encode_frame(tok, silo.frame), int(tok.pad_token_id),
                             batch_size=ask.calibration_batch, steps=ask.calibration_steps,
                             seed=ask.run_seed)
    return ImportanceReply(num_examples=answer.num_examples, max_tokens=answer.max_tokens,
                           scores=answer.scores).reply_to(msg)
