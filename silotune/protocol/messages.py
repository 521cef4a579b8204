"""Typed messages between the coordinator and the silos, each parsed in one place.

Every request and reply of the protocol is a frozen dataclass here. A field's metadata
names its record key (`keys.py`) and the record it travels in: ``config`` (the request's
settings), ``metrics`` (numbers from a silo), ``info`` (strings from a silo), or a whole
record of its own (``importance`` scores, a declared ``profile``). `to_content` writes
the Flower `RecordDict`; `from_content` reads one back and raises `MessageError` naming
the field when a value is missing, of the wrong type, not finite or outside the field's
`Range`, or when the fields disagree (an epsilon without its limit, an epsilon above
it), so a malformed message is refused before anything uses it: a reply can only cost
its sender (docs/architecture.md, "Trust boundary"). The same checks run when a silo
builds its reply. Array payloads travel in the ``arrays`` record through `codec` (fp16
or fp32 on the wire).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from silotune.protocol import keys as P
from silotune.protocol.codec import from_record, to_record
from silotune.protocol.fields import (
    COUNT,
    EPSILON_SLACK,
    NON_NEGATIVE,
    OPEN_UNIT,
    POSITIVE,
    PROBABILITY,
    MessageError,
    Range,
    check_silo_id,
    decode,
    encode,
    own_record,
)

M = TypeVar("M", bound="Payload")


def _key(key: str, record: str = "config", *, allow_inf: bool = False,
         within: Range | None = None, default: Any = dataclasses.MISSING) -> Any:
    """A message field travelling as `key` in `record` (``config``/``metrics``/``info``);
    a number outside `within` (when given) is refused."""
    meta = {"key": key, "record": record, "allow_inf": allow_inf, "within": within}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def _mapping(key: str, kind: str) -> Any:
    """A field that is a whole record of its own (`kind`: ``metrics`` or ``config``)."""
    return field(default=None, metadata={"key": key, "record": "own-" + kind})


def _arrays() -> Any:
    """The message's named arrays (the ``arrays`` record), compared by nobody."""
    return field(default_factory=dict, compare=False,
                 metadata={"key": P.ARRAYS, "record": "arrays"})


@dataclass(frozen=True)
class Payload:
    """Base of every message: (de)serialisation driven by the fields' metadata."""

    message_type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Every field within its `Range`, silo ids well formed, then `check`."""
        for f in dataclasses.fields(self):
            value, within = getattr(self, f.name), f.metadata.get("within")
            if value is None:
                continue
            if within is not None and (isinstance(value, bool) or not isinstance(
                    value, int | float) or value not in within):
                raise MessageError(f"message field '{f.metadata['key']}' = {value!r} is out of "
                                   f"range; allowed: {within}")
            if f.metadata.get("key") == P.SILO_ID:
                check_silo_id(value)
        self.check()

    def check(self) -> None:
        """Checks across fields (a message type overrides this)."""

    def to_content(self, wire_dtype: str = "fp32") -> RecordDict:
        """The Flower records of this message (arrays cast to `wire_dtype`)."""
        records: dict[str, dict[str, Any]] = {}
        content = RecordDict()
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            if meta["record"] == "arrays":
                content[P.ARRAYS] = to_record(value, wire_dtype)
            elif meta["record"] == "own-metrics":
                content[meta["key"]] = MetricRecord(dict(value))
            elif meta["record"] == "own-config":
                content[meta["key"]] = ConfigRecord(dict(value))
            else:
                records.setdefault(meta["record"], {})[meta["key"]] = encode(value)
        for record, values in records.items():
            kind = MetricRecord if record == "metrics" else ConfigRecord
            content[_RECORD_KEYS[record]] = kind(values)
        return content

    @classmethod
    def from_content(cls: type[M], content: RecordDict) -> M:
        """Read and check every field; `MessageError` names the first bad one."""
        hints = _type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta["record"] == "arrays":
                arrays = content.array_records.get(P.ARRAYS)
                values[f.name] = from_record(arrays) if arrays is not None else {}
                continue
            if meta["record"].startswith("own-"):
                source = (content.metric_records if meta["record"] == "own-metrics"
                          else content.config_records)
                own = source.get(meta["key"])
                values[f.name] = None if own is None else own_record(meta["key"], own,
                                                               hints[f.name])
                continue
            source = (content.metric_records if meta["record"] == "metrics"
                      else content.config_records)
            record = source.get(_RECORD_KEYS[meta["record"]])
            if record is None or meta["key"] not in record:
                if f.default is dataclasses.MISSING:
                    raise MessageError(f"message field '{meta['key']}' is missing")
                continue
            values[f.name] = decode(record[meta["key"]], hints[f.name], meta["key"],
                                     meta["allow_inf"])
        return cls(**values)

    def to_message(self, dst_node_id: int, wire_dtype: str = "fp32") -> Message:
        """A request to node `dst_node_id`."""
        return Message(self.to_content(wire_dtype), dst_node_id=dst_node_id,
                       message_type=self.message_type)

    def reply_to(self, msg: Message, wire_dtype: str = "fp32") -> Message:
        """This payload as the reply to `msg`."""
        return Message(self.to_content(wire_dtype), reply_to=msg)

    @classmethod
    def from_message(cls: type[M], msg: Message) -> M:
        return cls.from_content(msg.content)


_RECORD_KEYS = {"config": P.CONFIG, "metrics": P.METRICS, "info": P.INFO}

_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    """The field types of a message class, resolved once, not for every message parsed."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


# -- hello ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello(Payload):
    """The coordinator's first contact with a node: who are you?"""

    message_type: ClassVar[str] = P.QUERY_HELLO


@dataclass(frozen=True)
class HelloReply(Payload):
    """A silo's id, its size and (FedPipe) its declared resource profile."""

    silo_id: str = _key(P.SILO_ID, "info")
    num_examples: int | None = _key(P.NUM_EXAMPLES, "metrics", within=COUNT,
                                    default=None)  # declared
    profile: dict[str, Any] | None = _mapping(P.PROFILE, "config")


# -- LoRA training ----------------------------------------------------------------------
@dataclass(frozen=True)
class TrainInstruction(Payload):
    """One round's instructions to one silo: everything it trains with, plus the global
    rounds it lacks (``round-<t>/...``) and, unless seeded, its start (``init/...``)."""

    message_type: ClassVar[str] = "train"

    round: int = _key(P.ROUND)
    federation_id: str = _key(P.FEDERATION_ID)
    model: str = _key(P.MODEL)
    rank: int = _key(P.RANK)
    alpha: float = _key(P.ALPHA)
    targets: tuple[str, ...] = _key(P.TARGETS)
    local_steps: int = _key(P.LOCAL_STEPS)
    planned_rounds: int = _key(P.PLANNED_ROUNDS)
    batch_size: int = _key(P.BATCH_SIZE)
    physical_batch_size: int = _key(P.PHYSICAL_BATCH_SIZE)
    base_precision: str = _key(P.BASE_PRECISION)
    learning_rate: float = _key(P.LEARNING_RATE)
    max_grad_norm: float = _key(P.MAX_GRAD_NORM)
    target_epsilon: float = _key(P.TARGET_EPSILON, allow_inf=True)
    target_delta: float = _key(P.TARGET_DELTA)
    run_seed: int = _key(P.RUN_SEED)
    frozen: tuple[str, ...] = _key(P.FROZEN_FACTORS)
    upload: tuple[str, ...] = _key(P.UPLOAD_FACTORS)
    local: tuple[str, ...] = _key(P.LOCAL_FACTORS)
    wire_dtype: str = _key(P.WIRE_DTYPE)
    upload_density: float = _key(P.UPLOAD_DENSITY)
    update_scales: dict[str, float] = _key(P.UPDATE_SCALES)
    base_fingerprints: list[str] = _key(P.BASE_FINGERPRINTS)
    first_sent_round: int = _key(P.FIRST_SENT_ROUND)
    init_seed: int | None = _key(P.INIT_SEED, default=None)
    # seq of this silo's ledger head the coordinator last recorded (None: none yet)
    ledger_since: int | None = _key(P.LEDGER_SINCE, default=None)
    arrays: dict[str, np.ndarray] = _arrays()


@dataclass(frozen=True, kw_only=True)
class TrainingReply(Payload):
    """What every training reply carries: the silo, its declared size, and what it spent
    (the accounting fields are absent after a non-private training)."""

    silo_id: str = _key(P.SILO_ID, "info")
    steps: int = _key(P.STEPS, "metrics", within=COUNT)
    num_examples: int | None = _key(P.NUM_EXAMPLES, "metrics", within=COUNT,
                                    default=None)  # declared
    epsilon: float | None = _key(P.EPSILON, "metrics", within=NON_NEGATIVE, default=None)
    delta: float | None = _key(P.DELTA, "metrics", within=OPEN_UNIT, default=None)
    epsilon_limit: float | None = _key(P.EPSILON_LIMIT, "metrics", allow_inf=True,
                                       within=POSITIVE, default=None)
    noise_multiplier: float | None = _key(P.NOISE_MULTIPLIER, "metrics", within=NON_NEGATIVE,
                                          default=None)
    ledger_head: str | None = _key(P.LEDGER_HEAD, "info", default=None)
    # the entries since the request's `ledger_since` (silotune/privacy/ledger.chain_links)
    ledger_chain: list[list[Any]] | None = _key(P.LEDGER_CHAIN, "info", default=None)
    ledger_key: str | None = _key(P.LEDGER_KEY, "info", default=None)

    ACCOUNTING: ClassVar[tuple[str, ...]] = (
        "epsilon", "delta", "epsilon_limit", "noise_multiplier", "ledger_head")

    def check(self) -> None:
        """The accounting fields come together (a private training) or not at all, and
        the cumulative epsilon is within the silo's limit."""
        present = [n for n in self.ACCOUNTING if getattr(self, n) is not None]
        if present and len(present) < len(self.ACCOUNTING):
            missing = [n for n in self.ACCOUNTING if n not in present]
            raise MessageError(f"accounting fields {present} without {missing}: a private "
                               "training reports all of them, a non-private one none")
        if self.epsilon is not None and self.epsilon_limit is not None \
                and self.epsilon > self.epsilon_limit * (1 + EPSILON_SLACK):
            raise MessageError(f"epsilon {self.epsilon:g} exceeds the silo's epsilon-limit "
                               f"{self.epsilon_limit:g}")


@dataclass(frozen=True, kw_only=True)
class TrainReply(TrainingReply):
    """A silo's trained adapter (PEFT keys, the factors the plan uploads) and the
    release manifest's fields of a train reply."""

    base_version: int = _key(P.BASE_VERSION, "metrics", within=NON_NEGATIVE)
    worker: str | None = _key(P.WORKER_NODE, "info", default=None)  # simulations only
    peak_memory: int | None = _key(P.PEAK_MEMORY, "metrics", within=NON_NEGATIVE,
                                   default=None)  # simulations
    arrays: dict[str, np.ndarray] = _arrays()


# -- FedPipe importance -----------------------------------------------------------------
@dataclass(frozen=True)
class ImportanceQuery(Payload):
    """Score every candidate weight matrix of `model` on a small calibration batch."""

    message_type: ClassVar[str] = P.QUERY_IMPORTANCE

    federation_id: str = _key(P.FEDERATION_ID)
    model: str = _key(P.MODEL)
    calibration_steps: int = _key(P.CALIBRATION_STEPS)
    calibration_batch: int = _key(P.CALIBRATION_BATCH)
    run_seed: int = _key(P.RUN_SEED)


@dataclass(frozen=True)
class ImportanceReply(Payload):
    """One smoothed sensitivity per candidate matrix, and the silo's sizes."""

    max_tokens: int = _key(P.MAX_TOKENS, "metrics", within=COUNT)
    num_examples: int | None = _key(P.NUM_EXAMPLES, "metrics", within=COUNT,
                                    default=None)  # declared
    scores: dict[str, float] | None = _mapping(P.IMPORTANCE, "metrics")


# -- CrossLM ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SlmTrainRequest(Payload):
    """Train the silo's small model on its private data plus the kept synthetic set."""

    message_type: ClassVar[str] = f"train.{P.TRAIN_SLM}"

    round: int = _key(P.ROUND)
    slm: str = _key(P.SLM)
    labels: list[str] = _key(P.LABELS)
    synthetic: list[Any] = _key(P.SYNTHETIC)
    slm_steps: int = _key(P.SLM_STEPS)
    batch_size: int = _key(P.BATCH_SIZE)
    learning_rate: float = _key(P.LEARNING_RATE)
    max_grad_norm: float = _key(P.MAX_GRAD_NORM)
    target_epsilon: float = _key(P.TARGET_EPSILON, allow_inf=True)
    target_delta: float = _key(P.TARGET_DELTA)
    planned_rounds: int = _key(P.PLANNED_ROUNDS)
    run_seed: int = _key(P.RUN_SEED)
    ledger_since: int | None = _key(P.LEDGER_SINCE, default=None)  # as TrainInstruction's


@dataclass(frozen=True, kw_only=True)
class SlmTrainReply(TrainingReply):
    """The manifest's fields of an SLM training."""

    slm_accuracy: float = _key(P.SLM_ACCURACY, "metrics", within=PROBABILITY)


@dataclass(frozen=True)
class ScoreRequest(Payload):
    """Score the LLM's synthetic examples with the silo's SLM (CrossLM feedback)."""

    message_type: ClassVar[str] = f"query.{P.QUERY_SCORE}"

    round: int = _key(P.ROUND)
    slm: str = _key(P.SLM)
    labels: list[str] = _key(P.LABELS)
    synthetic: list[Any] = _key(P.SYNTHETIC)
    private_run: bool = _key(P.PRIVATE_RUN)
    run_seed: int = _key(P.RUN_SEED)


@dataclass(frozen=True)
class ScoreReply(Payload):
    """p_SLM(y_j | x_j) per synthetic example, the silo's size and its SLM's DP flag."""

    silo_id: str = _key(P.SILO_ID, "info")
    scores: list[float] = _key(P.SCORES, "metrics")
    slm_dp: bool = _key(P.SLM_DP, "metrics")
    num_examples: int | None = _key(P.NUM_EXAMPLES, "metrics", within=COUNT,
                                    default=None)  # declared
    ledger_head: str | None = _key(P.LEDGER_HEAD, "info", default=None)

