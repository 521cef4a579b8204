"""`silotune agent`'s resource-profile and data-column flags: flags -> node config string
(Flower's parser) -> NodeSettings and SiloProfile, and the errors of bad declarations."""

from __future__ import annotations

import math
import re

import pytest
from flwr.common.config import parse_config_args

from silotune import cli
from silotune.client import node
from silotune.deploy import agent
from silotune.deploy.agent import AgentSettings, supernode_command
from silotune.planning import profiles
from silotune.planning.profiles import ProfileError, SiloProfile

FULL = ["--memory-gb", "8", "--gflops", "400", "--upload-mbps", "100",
        "--download-mbps", "50", "--round-seconds", "600"]


def _agent(tmp_path, monkeypatch, *flags: str) -> tuple[int, AgentSettings | None]:
    """Run `silotune agent` with `flags` up to the point it would start the SuperNode."""
    seen: list[AgentSettings] = []
    monkeypatch.setattr(agent, "run", lambda settings, _log: seen.append(settings) or 0)
    code = cli.main(["agent", "--insecure", "--silo-id", "hospital-a",
                     "--data", str(tmp_path / "train.jsonl"),
                     "--state-dir", str(tmp_path / "state"), "--epsilon", "8",
                     "--delta", "1e-5", *flags])
    return code, (seen[0] if seen else None)


def _node_config(settings: AgentSettings) -> dict[str, object]:
    """The node config the SuperNode receives, as Flower parses it."""
    cmd = supernode_command(settings)
    return parse_config_args([cmd[cmd.index("--node-config") + 1]])


def test_agent_flags_round_trip_to_node_settings_and_silo_profile(tmp_path, monkeypatch):
    code, settings = _agent(tmp_path, monkeypatch, *FULL, "--precisions", "bf16, fp32",
                            "--profile-name", "gpu-server", "--text-column", "note",
                            "--label-column", "code")
    assert code == 0 and settings is not None
    expected = SiloProfile("gpu-server", 8.0, 400.0, 100.0, 50.0, 600.0,
                           frozenset({"fp32", "bf16"}))
    assert settings.node.profile == expected
    parsed = _node_config(settings)
    assert parsed[profiles.MEMORY_GB] == 8.0 and parsed[profiles.PROFILE_PRECISIONS] == \
        "fp32,bf16"  # registry order
    assert "profile" not in parsed  # the old informational cpu/gpu key is gone
    assert SiloProfile.from_node_config(parsed) == expected
    assert node.from_node_config(parsed) == node.NodeSettings(
        "hospital-a", (tmp_path / "train.jsonl").resolve(), (tmp_path / "state").resolve(),
        8.0, 1e-5, profile=expected, text_column="note", label_column="code")
    assert expected.allowed_precisions(("fp32", "bf16")) == ("fp32", "bf16")
    # the hello reply carries the same form (a ConfigRecord of str and float values)
    assert SiloProfile.from_node_config(dict(expected.to_node_config())) == expected


def test_no_declaration_gives_none_and_default_columns(tmp_path, monkeypatch):
    code, settings = _agent(tmp_path, monkeypatch)
    assert code == 0 and settings is not None
    parsed = _node_config(settings)
    assert settings.node.profile is None and SiloProfile.from_node_config(parsed) is None
    assert not set(profiles.RESOURCE_KEYS) & set(parsed)
    back = node.from_node_config(parsed)
    assert (back.profile, back.text_column, back.label_column) == (None, "text", "label")
    # without precisions or a name: every precision, the default name
    code, settings = _agent(tmp_path, monkeypatch, *FULL)
    assert settings is not None and settings.node.profile is not None
    assert settings.node.profile.precisions is None
    assert settings.node.profile.name == profiles.DECLARED
    assert settings.node.profile.allowed_precisions(("fp32", "bf16")) == ("fp32", "bf16")
    assert profiles.PROFILE_PRECISIONS not in _node_config(settings)


@pytest.mark.parametrize(("flags", "message"), [
    (["--memory-gb", "8", "--gflops", "400"],
     "lacks upload-mbps, download-mbps, round-seconds.*--upload-mbps, --download-mbps, "
     "--round-seconds"),
    (["--precisions", "bf16"], "precisions given but no resource profile.*--memory-gb"),
    (["--profile-name", "cpu"], "profile-name given but no resource profile"),
    ([*FULL[:1], "-2", *FULL[2:]], r"memory-gb = -2\.0 is out of range; allowed: a finite "
     "number > 0"),
    ([*FULL[:3], "nan", *FULL[4:]], "gflops = nan is out of range"),
    ([*FULL[:-1], "inf"], "round-seconds = inf is out of range"),
    ([*FULL, "--precisions", "fp32,int8"], "unknown base precision 'int8'; allowed: a "
     "comma list of fp32, bf16"),
    ([*FULL, "--precisions", ","], "precisions = ',' is empty"),
    (["--text-column", "x", "--label-column", "x"], "must name different columns"),
    (["--label-column", ""], "label-column '' must be a non-empty column name"),
])
def test_bad_declarations_are_named(tmp_path, monkeypatch, capsys, flags, message):
    code, settings = _agent(tmp_path, monkeypatch, *flags)
    assert code == 2 and settings is None
    assert re.search(message, capsys.readouterr().err)


def test_node_config_values_are_checked_on_the_silo():
    base = {"silo-id": "s", "data-path": "/d", "state-dir": "/s", "epsilon": 8.0,
            "delta": 1e-5}
    full = {k: 1.0 for k in profiles.RESOURCE_KEYS}
    with pytest.raises(node.NodeConfigError, match="lacks gflops"):
        node.from_node_config({**base, profiles.MEMORY_GB: 2.0})
    with pytest.raises(node.NodeConfigError, match=r"memory-gb = 'lots' is not a number"):
        node.from_node_config({**base, **full, profiles.MEMORY_GB: "lots"})
    with pytest.raises(ProfileError, match="memory-gb = True is not a number"):
        SiloProfile.from_node_config({**full, profiles.MEMORY_GB: True})
    with pytest.raises(ProfileError, match="unknown base precision 'nf4'"):
        SiloProfile.from_node_config({**full, profiles.PROFILE_PRECISIONS: "nf4"})
    assert SiloProfile.from_node_config({**full, "memory-gb": "2"}).memory_gb == 2.0
    assert not math.isnan(SiloProfile.from_node_config(full).gflops)
    with pytest.raises(ProfileError, match="profile-name '' must be a non-empty label"):
        SiloProfile("", 1.0, 1.0, 1.0, 1.0, 1.0)


def test_weakest_keeps_only_the_common_precisions():
    a = SiloProfile("a", 4.0, 1.0, 1.0, 1.0, 1.0, frozenset({"fp32", "bf16"}))
    b = SiloProfile("b", 2.0, 1.0, 1.0, 1.0, 1.0, frozenset({"bf16"}))
    c = SiloProfile("c", 1.0, 1.0, 1.0, 1.0, 1.0)  # any precision
    assert profiles.weakest([a, b, c]).precisions == frozenset({"bf16"})
    assert profiles.weakest([c]).precisions is None
    with pytest.raises(ProfileError, match="no base precision in common"):
        profiles.weakest([SiloProfile("d", 1.0, 1.0, 1.0, 1.0, 1.0, frozenset({"fp32"})), b])


def test_an_agent_without_epsilon_or_delta_exits_with_a_clear_error(tmp_path, capsys):
    for missing in ("--epsilon", "--delta"):
        flags = {"--epsilon": "8", "--delta": "1e-5"}
        del flags[missing]
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["agent", "--insecure", "--silo-id", "h", "--data", str(tmp_path / "d"),
                      "--state-dir", str(tmp_path / "s"),
                      *[x for kv in flags.items() for x in kv]])
        assert exit_info.value.code == 2
        assert missing in capsys.readouterr().err  # argparse names the missing flag
