"""One LoRA training round on a silo: instruction in, adapter and manifest fields out.

Steps (docs/architecture.md, "One round"): refuse a round already spent; bring the base
to the current global state from the rounds on disk plus those just received; build the
planned start; train with DP-SGD under the silo's budget; keep the factors the rule
leaves on the silo; upload only the factors the plan names (compressed on request).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from flwr.app import Context, Message

from silotune.adapters.codec import as_received, update_from_arrays
from silotune.adapters.compression import compress_arrays, peft_b, upload_reference
from silotune.adapters.starts import seeded_start
from silotune.adapters.types import LoraFactors, is_factor, peft_key
from silotune.client import replay
from silotune.client.base_store import STORE
from silotune.client.history import complete_history
from silotune.client.local import Silo
from silotune.client.silo import SiloPrivacy
from silotune.client.spend import (
    Request,
    RoundAlreadyTrainedError,
    private_training,
    spent_fields,
)
from silotune.ml.assets import resolve_model
from silotune.ml.dp_sgd import DPConfig, unit_rows
from silotune.ml.lm import encode_frame
from silotune.ml.memory import PeakRSS
from silotune.ml.merge import module_shapes
from silotune.ml.train import LocalTrainConfig, LocalTrainResult, train_local
from silotune.privacy.ledger import chain_links
from silotune.protocol import keys as P
from silotune.protocol.codec import from_record, to_record
from silotune.protocol.messages import TrainInstruction, TrainReply

log = logging.getLogger(__name__)


def train_round(msg: Message, context: Context, silo: Silo) -> Message:
    """Answer one train message (see the module docstring)."""
    ask = TrainInstruction.from_message(msg)
    privacy = silo.privacy(ask.max_grad_norm, ask.target_epsilon)
    if privacy.private:
        silo.policy.check_train(ask.target_epsilon, ask.target_delta,
                                ask.planned_rounds * ask.local_steps)
        kept = replay.load_reply(silo.state_dir, ask.federation_id, ask.round,
                                 ask.base_fingerprints)
        if kept is not None:  # asked again after a coordinator restart: no second spend
            log.warning("%s: round %d of %s was already trained; sending the kept reply",
                        silo.silo_id, ask.round, ask.federation_id)
            return silo.reply(_rechained(kept, silo, ask.ledger_since), msg, ask.wire_dtype)
    rounds = complete_history(silo.state_dir / "history" / ask.federation_id, ask.arrays,
                              ask.base_fingerprints, ask.first_sent_round)
    updates = [update_from_arrays(rounds, f"{P.UPDATE_PREFIX}{t}/", ask.update_scales[str(t)])
               for t in range(1, len(ask.base_fingerprints) + 1)]
    base, tok = STORE.get(str(resolve_model(ask.model)), str(context.run_id), updates,
                          ask.base_fingerprints)
    frame = silo.frame
    examples = encode_frame(tok, frame)
    start = _planned_start(ask, module_shapes(base, ask.targets))
    local = _local_config(ask, silo, _initial_factors(start, ask, context))
    pad_id = int(tok.pad_token_id)

    units = (unit_rows(frame["unit"].tolist())
             if silo.policy.privacy_unit_column is not None else None)

    def train(dp: DPConfig | None) -> LocalTrainResult:
        return train_local(base, examples, pad_id, local, dp, units=units)

    with PeakRSS() as peak:
        if privacy.private:
            request = Request(ask.federation_id, ask.round, ask.target_epsilon,
                              ask.target_delta, local.batch_size, local.local_steps,
                              ask.planned_rounds * local.local_steps, ledger_since=ask.ledger_since)
            result, spent = private_training(
                silo, privacy, request, frame, train,
                already_done=lambda budget: _refuse_a_second_spend(budget, ask))
        else:
            result, spent = train(None), None
    if ask.local:
        context.state[P.LOCAL_FACTORS] = to_record(
            {k: v for k, v in result.adapter.items() if is_factor(k, ask.local)})
    sent = {k: v for k, v in result.adapter.items() if is_factor(k, ask.upload)}
    if ask.upload_density < 1.0:  # send the change from the start, top-k ternary (ComPEFT)
        sent = compress_arrays(sent, upload_reference(start, ask.alpha / ask.rank, ask.local),
                               ask.upload_density)
    diagnostics = silo.policy.diagnostics  # a simulation's own measurements
    reply = TrainReply(silo_id=silo.silo_id, num_examples=silo.declared_size(),
                       base_version=len(ask.base_fingerprints), steps=result.steps,
                       worker=silo.worker if diagnostics else None,
                       peak_memory=peak.bytes if diagnostics else None,
                       arrays=sent, **spent_fields(spent))
    if privacy.private:
        replay.save_reply(silo.state_dir, ask.federation_id, ask.round,
                          ask.base_fingerprints, reply)
    return silo.reply(reply, msg, ask.wire_dtype)


def _rechained(kept: TrainReply, silo: Silo, since: int | None) -> TrainReply:
    """The kept reply with its ledger chain rebuilt from the head this request names (a
    resumed coordinator may have acknowledged another head since), up to its own entry."""
    if not kept.ledger_chain:
        return kept
    newest = int(kept.ledger_chain[-1][0])
    entries = [e for e in silo.ledger().entries() if e.get("seq", -1) <= newest]
    return dataclasses.replace(kept, ledger_chain=chain_links(entries, since))


def _refuse_a_second_spend(budget: SiloPrivacy, ask: TrainInstruction) -> None:
    if any(e.get("type") == "train" and e.get("run_id") == ask.federation_id
           and e.get("round") == ask.round for e in budget.ledger.entries()):
        raise RoundAlreadyTrainedError(
            f"round {ask.round} of {ask.federation_id} is already in this silo's ledger and "
            "its reply was not kept; the silo will not train (and spend budget on) it twice")


def _local_config(ask: TrainInstruction, silo: Silo,
                  init: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> LocalTrainConfig:
    return LocalTrainConfig(
        rank=ask.rank, alpha=ask.alpha, targets=ask.targets, init=init, frozen=ask.frozen,
        local_steps=ask.local_steps, batch_size=ask.batch_size,
        physical_batch_size=ask.physical_batch_size, base_precision=ask.base_precision,
        learning_rate=ask.learning_rate,
        init_seed=ask.run_seed * 100_003 + ask.round * 1009 + silo.index)


def _planned_start(ask: TrainInstruction, shapes: dict[str, tuple[int, int]]
                   ) -> dict[str, LoraFactors]:
    """The plan's start (scale-1 convention) exactly as the coordinator holds it: sent as
    arrays, or regenerated from its seed and decoded through the same wire dtype."""
    if ask.init_seed is not None:
        seeded = seeded_start(shapes, ask.rank, ask.init_seed)
        return dict(as_received(seeded, ask.wire_dtype).modules)
    return dict(update_from_arrays(ask.arrays, P.INIT_PREFIX, 1.0).modules)


def _initial_factors(start: dict[str, LoraFactors], ask: TrainInstruction, context: Context
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The plan's starting factors as PEFT holds them (B divided by the silo's scale),
    with the factors kept local replaced by this silo's own last values."""
    if not start:
        return None
    scale = ask.alpha / ask.rank
    init = {m: (np.asarray(f.A, dtype=np.float32), peft_b(f.B, scale))
            for m, f in start.items()}
    stored = context.state.array_records.get(P.LOCAL_FACTORS)
    own = from_record(stored) if stored is not None else {}
    for module, factors in init.items():
        pair = list(factors)
        for index, factor in enumerate(("A", "B")):
            mine = own.get(peft_key(module, factor))
            if factor in ask.local and mine is not None and mine.shape == pair[index].shape:
                pair[index] = mine
        init[module] = (pair[0], pair[1])
    return init
