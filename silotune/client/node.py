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
``epsilon``           the silo's total epsilon budget ("inf": follow a non-private run)
``delta``             the silo's DP delta
``text-column``       the column of the silo's data holding the text ("text")
``label-column``      the column holding the label ("label")
====================  =================================================================

``epsilon`` and ``delta`` are optional: without them the run's targets apply. A silo may
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

from silotune.planning.profiles import ProfileError, SiloProfile

SILO_ID: Final = "silo-id"
DATA_PATH: Final = "data-path"
STATE_DIR: Final = "state-dir"
EPSILON: Final = "epsilon"
DELTA: Final = "delta"
TEXT_COLUMN: Final = "text-column"
LABEL_COLUMN: Final = "label-column"


class NodeConfigError(ValueError):
    """A deployed silo's node config is incomplete or out of range."""


@dataclass(frozen=True)
class NodeSettings:
    """One deployed silo's settings (see the module docstring)."""

    silo_id: str
    data_path: Path
    state_dir: Path
    epsilon: float | None = None  # None: the run's target_epsilon
    delta: float | None = None  # None: the run's target_delta
    profile: SiloProfile | None = None  # None: no FedPipe resource profile declared
    text_column: str = "text"
    label_column: str = "label"

    def __post_init__(self) -> None:
        if not self.silo_id or any(c.isspace() or c in "'\"/" for c in self.silo_id):
            raise NodeConfigError(f"{SILO_ID} {self.silo_id!r} must be a non-empty name "
                                  "without spaces, quotes or '/'")
        if self.epsilon is not None and (math.isnan(self.epsilon) or self.epsilon <= 0):
            raise NodeConfigError(f"{EPSILON} = {self.epsilon} must be > 0 (or inf)")
        if self.delta is not None and not 0.0 < self.delta < 0.1:
            raise NodeConfigError(f"{DELTA} = {self.delta} must be in (0, 0.1)")
        for key, column in ((TEXT_COLUMN, self.text_column),
                            (LABEL_COLUMN, self.label_column)):
            if not column.strip() or '"' in column:
                raise NodeConfigError(f"{key} {column!r} must be a non-empty column name "
                                      "without double quotes")
        if self.text_column == self.label_column:
            raise NodeConfigError(f"{TEXT_COLUMN} and {LABEL_COLUMN} are both "
                                  f"{self.text_column!r}; they must name different columns")

    @property
    def index(self) -> int:
        """A stable small integer for this silo (seeds its LoRA initialisation)."""
        return int(hashlib.sha256(self.silo_id.encode()).hexdigest()[:8], 16) % 100_003

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.jsonl"

    @property
    def key_path(self) -> Path:
        return self.state_dir / "ledger-signing-key.pem"

    def to_node_config(self) -> str:
        """The ``--node-config`` argument of ``flower-supernode``."""
        values: dict[str, str | float] = {SILO_ID: self.silo_id,
                                          DATA_PATH: str(self.data_path.resolve()),
                                          STATE_DIR: str(self.state_dir.resolve()),
                                          TEXT_COLUMN: self.text_column,
                                          LABEL_COLUMN: self.label_column}
        if self.epsilon is not None:
            values[EPSILON] = "inf" if math.isinf(self.epsilon) else self.epsilon
        if self.delta is not None:
            values[DELTA] = self.delta
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
    missing = [k for k in (SILO_ID, DATA_PATH, STATE_DIR) if k not in node_config]
    if missing:
        raise NodeConfigError(f"node config lacks {', '.join(missing)}; start the silo with "
                              "`silotune agent --silo-id ID --data FILE --state-dir DIR`")

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
                        epsilon=number(EPSILON), delta=number(DELTA), profile=profile,
                        text_column=str(node_config.get(TEXT_COLUMN, "text")),
                        label_column=str(node_config.get(LABEL_COLUMN, "label")))

