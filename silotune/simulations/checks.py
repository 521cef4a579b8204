"""Names in a run config checked against the registries that own them.

`RunConfig` checks types and ranges but imports nothing from silotune; the partition
method, the FedPipe profile mix and the base precision are names of registries in higher
layers, checked here before any heavy work (the CLI and the launcher call it).
"""

from __future__ import annotations

from silotune.config import ConfigError, RunConfig
from silotune.ml.precision import PRECISIONS
from silotune.planning.profiles import MIXES
from silotune.simulations.partition import PARTITIONERS


def check_names(cfg: RunConfig) -> None:
    """Raise `ConfigError` naming the key and the valid names for an unknown name."""
    if cfg.partition not in PARTITIONERS:
        _unknown("partition", cfg.partition, ", ".join(sorted(PARTITIONERS)))
    if cfg.profiles not in ("", "node", *MIXES):
        _unknown("profiles", cfg.profiles,
                 f"'' (off), 'node' (node config) or a mix: {', '.join(sorted(MIXES))}")
    if cfg.base_precision not in PRECISIONS:
        _unknown("base_precision", cfg.base_precision, ", ".join(PRECISIONS))


def _unknown(key: str, value: str, allowed: str) -> None:
    raise ConfigError(f"config key '{key}' = {value!r} is out of range; allowed: {allowed}")
