"""A deployed silo's own settings, carried in Flower's node config (`silotune agent`).

In simulation a silo is partition ``partition-id`` of the run's dataset. A deployed
silo instead owns its data, its privacy budget and its state directory; the silo admin
sets them when starting the agent, and the coordinator never sees the data path:

====================  =================================================================
node config key       meaning
====================  =================================================================
``silo-id``           the silo's name in metrics and ledgers (unique in the federation)
``data-path``         the silo's private training data (.jsonl/.json/.csv/.parquet)
``state-dir``         where the silo keeps its ledger, signing key and last reply
``epsilon``           the silo's lifetime epsilon limit (required; "inf": a non-private silo)
``delta``             the silo's DP delta (required)
``max-steps``         most DP-SGD steps it trains in one federation (optional: no cap)
``importance-queries`` most FedPipe importance queries it answers in its life (default 0)
``public-size``       a dataset size its operator declares public: the silo's aggregation
                      weight (optional; without it the silo's exact size never leaves)
``text-column``       the column of the silo's data holding the text ("text")
``label-column``      the column holding the label ("label")
====================  =================================================================

``epsilon``, ``delta``, ``max-steps`` and ``importance-queries`` are the silo's own privacy
policy (`silotune.client.policy`): a run can only ask for less. A silo may
also declare its FedPipe resource profile (``memory-gb``, ``gflops``, ``upload-mbps``,
``download-mbps``, ``round-seconds``, optional ``precisions`` and ``profile-name``):
the keys and their ranges are defined once in `silotune.planning.profiles`, which
reads them (`SiloProfile.from_node_config`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from silotune.client.policy import SiloPolicy
from silotune.planning.profiles import ProfileError, SiloProfile

SILO_ID: Final = "silo-id"
DATA_PATH: Final = "data-path"
STATE_DIR: Final = "state-dir"
EPSILON: Final = "epsilon"
DELTA: Final = "delta"
MAX_STEPS: Final = "max-steps"
IMPORTANCE_QUERIES: Final = "importance-queries"
PUBLIC_SIZE: Final = "public-size"
TEXT_COLUMN: Final = "text-column"
LABEL_COLUMN: Final = "label-column"
PRIVACY_UNIT_COLUMN: Final = "privacy-unit-column"


class NodeConfigError(ValueError):
    """A deployed silo's node config is incomplete or out of range."""


@dataclass(frozen=True)
class NodeSettings:
    """One deployed silo's settings (see the module docstring)."""

    silo_id: str
    data_path: Path
    state_dir: Path
    epsilon: float  # the silo's lifetime limit (inf: a non-private silo, by its choice)
    delta: float
    max_steps: int | None = None  # most DP-SGD steps per federation (None: no cap)
    importance_queries: int = 0  # most importance queries answered in its life
    public_size: int | None = None  # declared public: the aggregation weight
    profile: SiloProfile | None = None  # None: no FedPipe resource profile declared
    text_column: str = "text"
    label_column: str = "label"
    privacy_unit_column: str | None = None  # None: one row is the privacy unit

    def __post_init__(self) -> None:
        if not self.silo_id or any(c.isspace() or c in "'\"/" for c in self.silo_id):
            raise NodeConfigError(f"{SILO_ID} {self.silo_id!r} must be a non-empty name "
                                  "without spaces, quotes or '/'")
        if self.public_size is not None and self.public_size < 1:
            raise NodeConfigError(f"{PUBLIC_SIZE} = {self.public_size} must be >= 1")
        try:
            self.policy  # noqa: B018 (validates the policy's ranges)
        except ValueError as err:
            raise NodeConfigError(str(err)) from None
        for key, column in ((TEXT_COLUMN, self.text_column),
                            (LABEL_COLUMN, self.label_column)):
            if not column.strip() or '"' in column:
                raise NodeConfigError(f"{key} {column!r} must be a non-empty column name "
                                      "without double quotes")
        if self.privacy_unit_column in (self.text_column, self.label_column):
            raise NodeConfigError(f"{PRIVACY_UNIT_COLUMN} {self.privacy_unit_column!r} must "
                                  "name a column other than the text and the label")
        if self.text_column == self.label_column:
            raise NodeConfigError(f"{TEXT_COLUMN} and {LABEL_COLUMN} are both "
                                  f"{self.text_column!r}; they must name different columns")

    @property
    def policy(self) -> SiloPolicy:
        """The silo's own privacy policy."""
        return SiloPolicy(epsilon=self.epsilon, delta=self.delta, max_steps=self.max_steps,
                          importance_queries=self.importance_queries,
                          privacy_unit_column=self.privacy_unit_column)

    @property
    def index(self) -> int:
        """A stable small integer for this silo (seeds its LoRA initialisation)."""
        return int(hashlib.sha256(self.silo_id.encode()).hexdigest()[:8], 16) % 100_003

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.jsonl"

    def to_node_config(self) -> str:
        """The ``--node-config`` argument of ``flower-supernode``."""
        values: dict[str, str | float] = {SILO_ID: self.silo_id,
                                          DATA_PATH: str(self.data_path.resolve()),
                                          STATE_DIR: str(self.state_dir.resolve()),
                                          TEXT_COLUMN: self.text_column,
                                          LABEL_COLUMN: self.label_column,
                                          EPSILON: "inf" if math.isinf(self.epsilon)
                                          else self.epsilon, DELTA: self.delta,
                                          IMPORTANCE_QUERIES: float(self.importance_queries)}
        if self.max_steps is not None:
            values[MAX_STEPS] = float(self.max_steps)
        if self.public_size is not None:
            values[PUBLIC_SIZE] = float(self.public_size)
        if self.privacy_unit_column is not None:
            values[PRIVACY_UNIT_COLUMN] = self.privacy_unit_column
        if self.profile is not None:
            values.update(self.profile.to_node_config())
        parts = []
        for key, value in values.items():
            text = f'"{value}"' if isinstance(value, str) else repr(value)
            if isinstance(value, str) and '"' in value:
                raise NodeConfigError(f"{key} {value!r} must not contain a double quote")
            parts.append(f"{key}={text}")
        return " ".join(parts)


def is_deployed(node_config: Mapping[str, object]) -> bool:
    """True for a node started by ``silotune agent`` (it names its data and state)."""
    return DATA_PATH in node_config


def from_node_config(node_config: Mapping[str, object]) -> NodeSettings:
    """Read and validate a deployed silo's settings from Flower's node config."""
    missing = [k for k in (SILO_ID, DATA_PATH, STATE_DIR, EPSILON, DELTA)
               if k not in node_config]
    if missing:
        raise NodeConfigError(f"node config lacks {', '.join(missing)}; start the silo with "
                              "`silotune agent --silo-id ID --data FILE --state-dir DIR "
                              "--epsilon EPS --delta DELTA`")

    def number(key: str) -> float | None:
        value = node_config.get(key)
        if value is None:
            return None
        try:
            return float(str(value))
        except ValueError:
            raise NodeConfigError(f"node config {key} = {value!r} is not a number") from None

    try:
        profile = SiloProfile.from_node_config(node_config)
    except ProfileError as err:
        raise NodeConfigError(str(err)) from None
    return NodeSettings(silo_id=str(node_config[SILO_ID]),
                        data_path=Path(str(node_config[DATA_PATH])),
                        state_dir=Path(str(node_config[STATE_DIR])),
                        epsilon=float(number(EPSILON) or 0.0),
                        delta=float(number(DELTA) or 0.0),
                        max_steps=_whole(number(MAX_STEPS), MAX_STEPS),
                        importance_queries=_whole(number(IMPORTANCE_QUERIES),
                                                  IMPORTANCE_QUERIES) or 0,
                        public_size=_whole(number(PUBLIC_SIZE), PUBLIC_SIZE),
                        profile=profile,
                        text_column=str(node_config.get(TEXT_COLUMN, "text")),
                        label_column=str(node_config.get(LABEL_COLUMN, "label")),
                        privacy_unit_column=_optional_text(node_config, PRIVACY_UNIT_COLUMN))


def _optional_text(node_config: Mapping[str, object], key: str) -> str | None:
    value = node_config.get(key)
    return None if value is None else str(value)


def _whole(value: float | None, key: str) -> int | None:
    if value is None:
        return None
    if not value.is_integer():
        raise NodeConfigError(f"node config {key} = {value} must be a whole number")
    return int(value)
