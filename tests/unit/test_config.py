"""Run configuration: defaults match the Flower App config; bad values name the key."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import pytest

from silotune.config import SETTINGS, ConfigError, RunConfig, flower_key

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_flower_config_is_the_default_run():
    flwr_cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr_cfg["components"]["serverapp"] == "silotune.app:server_app"
    cfg = RunConfig.from_mapping(flwr_cfg["config"])
    assert cfg == RunConfig(out_dir=cfg.out_dir)
    # every key is there, so that `flwr run --run-config` can override any of them
    assert set(flwr_cfg["config"]) == set(RunConfig().to_flower())


def test_round_trip_through_flower_values():
    cfg = RunConfig(lora_ranks=(16, 2), target_epsilon=math.inf)
    again = RunConfig.from_mapping(cfg.to_flower())
    assert again == cfg and not again.private


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("target-epsilon", 0, "target_epsilon"),
    ("target-epsilon", -1.0, "> 0"),
    ("num-server-rounds", 0, "rounds"),
    ("fraction-train", 1.5, "(0, 1]"),
    ("lora-ranks", "8,0", "lora_ranks"),
    ("target-delta", 0.5, "target_delta"),
])
def test_out_of_range_values_name_the_key(key, value, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        RunConfig.from_mapping({key: value})
    assert fragment in str(err.value)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'roundz'.*num-server-rounds"):
        RunConfig.from_mapping({"roundz": 3})


def test_unreadable_value_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot read"):
        RunConfig.from_mapping({"local-steps": "many"})


def test_every_setting_has_one_user_facing_definition():
    """Each field has its Setting (help text, older flag names); no alias shadows another
    setting's key."""
    names = [f.name for f in dataclasses.fields(RunConfig) if f.name != "extra"]
    assert set(SETTINGS) == set(names)
    keys = {f"--{flower_key(n)}" for n in names}
    aliases = [a for s in SETTINGS.values() for a in s.aliases]
    assert all(s.help for s in SETTINGS.values())
    assert len(aliases) == len(set(aliases)) and not keys & set(aliases)
