"""The silo agent as a Flower ClientApp: hello (query) and train handlers.

Thin: it decodes messages, calls the silo's data, training and privacy code, and encodes
the reply. Known failures (budget exhausted, frozen LoRA, bad update) become error
replies with a message the coordinator logs and records; the round goes on without it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from silotune.adapters.codec import as_received, update_from_arrays
from silotune.adapters.compression import compress_arrays, peft_b, upload_reference
from silotune.adapters.starts import seeded_start
from silotune.adapters.types import AdapterError, LoraFactors, is_factor, peft_key
from silotune.client import node, replay
from silotune.client.base_store import STORE
from silotune.client.fedpipe import importance_reply, silo_profile
from silotune.client.history import MissingRoundsError, complete_history
from silotune.client.silo import SiloPrivacy, SiloPrivacyConfig
from silotune.config import RunConfig
from silotune.ml.assets import load_dataset_frame, resolve_model
from silotune.ml.lm import encode
from silotune.ml.memory import PeakRSS
from silotune.ml.merge import module_shapes
from silotune.ml.train import (
    DPConfig,
    LivenessError,
    LocalTrainConfig,
    sample_rate_for,
    train_local,
)
from silotune.planning.profiles import SiloProfile
from silotune.privacy.accounting import AccountingStep, BudgetExhausted
from silotune.protocol import keys as P
from silotune.protocol.codec import from_record, to_record
from silotune.simulations.cluster import worker_node
from silotune.simulations.federation import FederatedTask, federated_task, silo_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Silo:
    """Everything one silo needs for a run, derived from the run and node config."""

    silo_id: str
    index: int
    run: RunConfig
    task: FederatedTask | None  # simulation: the run's split; None for a deployed silo
    privacy: SiloPrivacyConfig
    data: pd.DataFrame | None = None  # a deployed silo's own data (node config data-path)
    profile: SiloProfile | None = None  # resources, for FedPipe auto-configuration

    def noise_seed(self, round_: int) -> int | None:
        """Seed of this round's DP noise: None (the OS seeds it) unless a simulation asks
        for reproducible noise (`RunConfig.dp_noise_seed`); a deployed silo never takes
        one, whatever the run config says."""
        if self.task is None or self.run.dp_noise_seed < 0:
            return None
        seeds = np.random.SeedSequence([self.run.dp_noise_seed, self.index, round_])
        return int(seeds.generate_state(1, np.uint64)[0] >> np.uint64(1))

    @cached_property
    def frame(self) -> pd.DataFrame:
        """This silo's private rows (loaded on first use, then kept for the call)."""
        if self.data is not None:
            return self.data
        if self.task is None:
            raise RuntimeError(f"silo {self.silo_id} has neither a data path nor a task")
        return self.task.silo_frame(self.index)


def silo_from_context(context: Context, preset: RunConfig | None) -> Silo:
    """Simulated silo `partition-id` of the run (run config from `preset` or Flower), or
    a deployed silo described by its node config (`silotune agent`, client/node.py)."""
    run = preset or RunConfig.from_mapping(context.run_config)
    if node.is_deployed(context.node_config):
        return _deployed_silo(node.from_node_config(context.node_config), run,
                              silo_profile(run, 0, context.node_config))
    index = int(context.node_config.get("partition-id", 0))
    num = int(context.node_config.get("num-partitions", run.num_silos))
    if num != run.num_silos:
        run = RunConfig.from_mapping({**run.to_flower(), "num-silos": num})
    silo_id = silo_name(index)
    out = Path(run.out_dir)
    privacy = SiloPrivacyConfig(silo_id=silo_id, target_epsilon=run.target_epsilon,
                                delta=run.target_delta, max_grad_norm=run.max_grad_norm,
                                ledger_path=out / "ledgers" / f"{silo_id}.jsonl",
                                key_path=out / "silos" / silo_id / "ledger-signing-key.pem")
    return Silo(silo_id, index, run, federated_task(run), privacy,
                profile=silo_profile(run, index, context.node_config))


def _deployed_silo(settings: node.NodeSettings, run: RunConfig,
                   profile: SiloProfile | None) -> Silo:
    """A deployed silo: its own data, budget, state directory and resource profile (its
    node config's, never the run's)."""
    if run.dp_noise_seed >= 0:
        log.warning("%s ignores dp-noise-seed: a deployed silo's DP noise is always seeded "
                    "by its OS", settings.silo_id)
    data = load_dataset_frame(str(settings.data_path), text_column=run.text_column,
                              label_column=run.label_column)
    privacy = SiloPrivacyConfig(
        silo_id=settings.silo_id,
        target_epsilon=run.target_epsilon if settings.epsilon is None else settings.epsilon,
        delta=run.target_delta if settings.delta is None else settings.delta,
        max_grad_norm=run.max_grad_norm, ledger_path=settings.ledger_path,
        key_path=settings.key_path)
    return Silo(settings.silo_id, settings.index, run, None, privacy, data, profile)


def build_client_app(preset: RunConfig | None = None,
                     mods: list[Mod] | None = None) -> ClientApp:
    """The ClientApp; `preset` fixes the run config (``silotune simulate``), else it is
    read from Flower's run config (``flwr run .``); `mods` wrap every handler."""
    app = ClientApp(mods=mods)

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        silo = silo_from_context(context, preset)
        info = ConfigRecord({P.SILO_ID: silo.silo_id})
        metrics = MetricRecord({P.NUM_EXAMPLES: len(silo.frame)})
        content = RecordDict({P.INFO: info, P.METRICS: metrics})
        if silo.profile is not None:
            content[P.PROFILE] = ConfigRecord(dict(silo.profile.to_node_config()))
        return Message(content, reply_to=msg)

    @app.query("importance")
    def importance(msg: Message, context: Context) -> Message:
        silo = silo_from_context(context, preset)
        return importance_reply(msg, silo.run.model, silo.frame, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        silo = silo_from_context(context, preset)
        try:
            return _train(msg, context, silo)
        except MissingRoundsError as err:
            log.warning("%s: %s", silo.silo_id, err)
            return Message(Error(code=P.ERROR_MISSING_ROUNDS, reason=str(err)), reply_to=msg)
        except (BudgetExhausted, LivenessError, AdapterError, ValueError,
                RoundAlreadyTrainedError) as err:
            log.warning("%s refused round: %s", silo.silo_id, err)
            return Message(Error(code=P.ERROR_REFUSED, reason=f"{type(err).__name__}: {err}"),
                           reply_to=msg)

    from silotune.client.crosslm import register_crosslm  # CrossLM mode: train.slm, query.score

    register_crosslm(app, preset)
    return app


class RoundAlreadyTrainedError(RuntimeError):
    """The silo's ledger already holds this round, and its reply was not kept."""


def _train(msg: Message, context: Context, silo: Silo) -> Message:
    cfg = msg.content.config_records[P.CONFIG]
    round_ = P.as_int(cfg[P.ROUND], P.ROUND)
    scales = json.loads(str(cfg[P.UPDATE_SCALES]))
    fingerprints = [str(f) for f in json.loads(str(cfg[P.BASE_FINGERPRINTS]))]
    # The federation id outlives coordinator restarts; the Flower run id does not.
    federation = str(cfg.get(P.FEDERATION_ID, context.run_id))
    state_dir = silo.privacy.key_path.parent
    if silo.privacy.private:
        kept = replay.load_reply(state_dir, federation, round_, fingerprints)
        if kept is not None:  # asked again after a coordinator restart: no second spend
            log.warning("%s: round %d of %s was already trained; sending the kept reply",
                        silo.silo_id, round_, federation)
            return _reply(msg, kept, str(cfg[P.WIRE_DTYPE]))
        if any(e.get("type") == "train" and e.get("run_id") == federation
               and e.get("round") == round_ for e in SiloPrivacy(silo.privacy).ledger.entries()):
            raise RoundAlreadyTrainedError(
                f"round {round_} of {federation} is already in this silo's ledger and its "
                "reply was not kept; the silo will not train (and spend budget on) it twice")
    record = msg.content.array_records.get(P.ARRAYS)
    arrays = from_record(record) if record is not None else {}
    rounds = complete_history(state_dir / "history" / federation, arrays, fingerprints,
                              P.as_int(cfg.get(P.FIRST_SENT_ROUND, 1), P.FIRST_SENT_ROUND))
    updates = [update_from_arrays(rounds, f"{P.UPDATE_PREFIX}{t}/", float(scales[str(t)]))
               for t in range(1, len(fingerprints) + 1)]
    base, tok = STORE.get(str(resolve_model(silo.run.model)), str(context.run_id),
                          updates, fingerprints)

    frame = silo.frame
    examples = [encode(tok, t, lab) for t, lab in zip(frame["text"], frame["label"],
                                                          strict=True)]
    rank, alpha = P.as_int(cfg[P.RANK], P.RANK), P.as_float(cfg[P.ALPHA], P.ALPHA)
    keep_local = P.as_tuple(cfg[P.LOCAL_FACTORS])
    targets = P.as_tuple(cfg[P.TARGETS])
    start = _planned_start(cfg, arrays, module_shapes(base, targets), rank)
    local = LocalTrainConfig(
        rank=rank, alpha=alpha, targets=targets,
        init=_initial_factors(start, alpha / rank, context, keep_local),
        frozen=P.as_tuple(cfg[P.FROZEN_FACTORS]),
        local_steps=P.as_int(cfg[P.LOCAL_STEPS], P.LOCAL_STEPS),
        batch_size=P.as_int(cfg[P.BATCH_SIZE], P.BATCH_SIZE),
        physical_batch_size=P.as_int(cfg.get(P.PHYSICAL_BATCH_SIZE,
                                             silo.run.physical_batch_size),
                                     P.PHYSICAL_BATCH_SIZE),
        base_precision=str(cfg.get(P.BASE_PRECISION, silo.run.base_precision)),
        learning_rate=P.as_float(cfg[P.LEARNING_RATE], P.LEARNING_RATE),
        init_seed=P.as_int(cfg[P.RUN_SEED], P.RUN_SEED) * 100_003 + round_ * 1009 + silo.index)

    metrics: dict[str, int | float | list[int] | list[float]] = {
        P.NUM_EXAMPLES: len(examples), P.BASE_VERSION: len(fingerprints)}
    info = ConfigRecord({P.SILO_ID: silo.silo_id, P.WORKER_NODE: worker_node()})
    if silo.privacy.private:
        privacy = SiloPrivacy(silo.privacy)
        q = sample_rate_for(len(examples), local.batch_size)
        planned = P.as_int(cfg[P.PLANNED_ROUNDS], P.PLANNED_ROUNDS) * local.local_steps
        sigma = privacy.noise_multiplier(federation, q, planned)
        step = AccountingStep(noise_multiplier=sigma, sample_rate=q, steps=local.local_steps)
        privacy.check_round(step)  # refuse before any training
        noise_seed = silo.noise_seed(round_)
        with PeakRSS() as peak:
            result = train_local(base, examples, int(tok.pad_token_id), local,
                                 DPConfig(noise_multiplier=sigma,
                                          max_grad_norm=silo.privacy.max_grad_norm,
                                          noise_seed=noise_seed))
        report, entry = privacy.record_round(
            step=step, run_id=federation, round_=round_, frame=frame,
            liveness=result.liveness, noise="os" if noise_seed is None else "seeded")
        metrics.update({P.EPSILON: report.epsilon, P.DELTA: silo.privacy.delta,
                        P.EPSILON_LIMIT: silo.privacy.target_epsilon})
        info[P.LEDGER_HEAD] = str(entry["entry_hash"])
    else:
        with PeakRSS() as peak:
            result = train_local(base, examples, int(tok.pad_token_id), local, dp=None)
    metrics.update({P.TRAIN_LOSS: result.loss, P.STEPS: result.steps})
    if peak.bytes is not None:
        metrics[P.PEAK_MEMORY] = peak.bytes
    if keep_local:
        context.state[P.LOCAL_FACTORS] = to_record(
            {k: v for k, v in result.adapter.items()
             if is_factor(k, keep_local)})
    upload = P.as_tuple(cfg[P.UPLOAD_FACTORS])
    sent = {k: v for k, v in result.adapter.items() if is_factor(k, upload)}
    density = P.as_float(cfg[P.UPLOAD_DENSITY], P.UPLOAD_DENSITY)
    if density < 1.0:  # send the change from the start, top-k ternary (ComPEFT-style)
        sent = compress_arrays(sent, upload_reference(start, alpha / rank, keep_local),
                               density)
    kept = replay.StoredReply(sent, dict(metrics), dict(info))
    if silo.privacy.private:
        replay.save_reply(state_dir, federation, round_, fingerprints, kept)
    return _reply(msg, kept, str(cfg[P.WIRE_DTYPE]))


def _reply(msg: Message, kept: replay.StoredReply, wire_dtype: str) -> Message:
    reply = RecordDict({P.ARRAYS: to_record(kept.arrays, wire_dtype),
                        P.METRICS: MetricRecord(kept.metrics),
                        P.INFO: ConfigRecord(kept.info)})
    return Message(reply, reply_to=msg)


def _planned_start(cfg: ConfigRecord, arrays: dict[str, np.ndarray],
                   shapes: dict[str, tuple[int, int]], rank: int) -> dict[str, LoraFactors]:
    """The plan's start (scale-1 convention) exactly as the coordinator holds it: sent as
    arrays, or regenerated from its seed and decoded through the same wire dtype."""
    if P.INIT_SEED in cfg:
        seeded = seeded_start(shapes, rank, P.as_int(cfg[P.INIT_SEED], P.INIT_SEED))
        return dict(as_received(seeded, str(cfg[P.WIRE_DTYPE])).modules)
    return dict(update_from_arrays(arrays, P.INIT_PREFIX, 1.0).modules)


def _initial_factors(start: dict[str, LoraFactors], scale: float, context: Context,
                     keep_local: tuple[str, ...]
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """The plan's starting factors as PEFT holds them (B divided by the silo's scale),
    with the factors kept local replaced by this silo's own last values."""
    if not start:
        return None
    init = {m: (np.asarray(f.A, dtype=np.float32), peft_b(f.B, scale))
            for m, f in start.items()}
    stored = context.state.array_records.get(P.LOCAL_FACTORS)
    own = from_record(stored) if stored is not None else {}
    for module, factors in init.items():
        pair = list(factors)
        for index, factor in enumerate(("A", "B")):
            mine = own.get(peft_key(module, factor))
            if factor in keep_local and mine is not None and mine.shape == pair[index].shape:
                pair[index] = mine
        init[module] = (pair[0], pair[1])
    return init


app = build_client_app()
