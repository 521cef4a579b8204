"""Deployment building blocks without processes: key material, node config, run-config
text and a silo's kept reply (the checkpoint: tests/unit/server/test_checkpoint.py)."""

from __future__ import annotations

import dataclasses
import math
import ssl
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from flwr.common.config import parse_config_args

from silotune.client import node, replay
from silotune.config import ConfigError, RunConfig
from silotune.deploy import certs
from silotune.deploy.agent import AgentSettings, supernode_command
from silotune.deploy.connection import Connection, DeployError
from silotune.deploy.coordinator import CoordinatorSettings, superlink_command
from silotune.deploy.submit import build_config, run_config_arg
from silotune.planning.profiles import SiloProfile
from silotune.protocol.messages import TrainReply


def test_certs_have_safe_modes_and_are_never_overwritten(tmp_path):
    out = tmp_path / "certs"
    first = certs.create_material(out, ["127.0.0.1", "coord.example.org"], ["h1"])
    assert len(first.written) == 6 and not first.kept
    for private in (certs.CA_KEY, certs.SERVER_KEY, "silos/h1/node.key"):
        assert stat.S_IMODE((out / private).stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    before = {p: p.read_bytes() for p in first.written}
    again = certs.create_material(out, ["127.0.0.1"], ["h1", "h2"])
    assert sorted(again.kept) == sorted(before)  # reported, not silently replaced
    assert all(p.read_bytes() == data for p, data in before.items())
    assert [p.name for p in again.written] == ["node.key", "node.pub"]  # only h2 is new

    server = x509.load_pem_x509_certificate((out / certs.SERVER_CERT).read_bytes())
    ca = certs.load_ca(out / certs.CA_CERT)
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    ssl.create_default_context(cafile=str(out / certs.CA_CERT))  # a CA TLS stacks accept
    key = certs.load_node_key(out / "silos" / "h1" / "node.key")
    assert key.curve.name == "secp384r1"
    assert (out / "silos/h1/node.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_missing_or_wrong_key_material_is_named(tmp_path):
    with pytest.raises(certs.CertsError, match=r"does not exist.*silotune certs"):
        certs.load_node_key(tmp_path / "node.key")
    (tmp_path / "node.key").write_text("not a key")
    with pytest.raises(certs.CertsError, match="not an unencrypted OpenSSH"):
        certs.load_node_key(tmp_path / "node.key")
    with pytest.raises(certs.CertsError, match="simple name"):
        certs.create_material(tmp_path, silos=["../evil"])


def test_node_config_round_trips_through_flowers_parser(tmp_path):
    profile = SiloProfile("gpu box", 8.0, 400.0, 100.0, 50.0, 600.0, frozenset({"bf16"}))
    settings = node.NodeSettings(silo_id="hospital-1", data_path=tmp_path / "d.jsonl",
                                 state_dir=tmp_path / "state", epsilon=math.inf, delta=1e-6,
                                 max_steps=40, importance_queries=1, public_size=120,
                                 profile=profile, text_column="note text",
                                 label_column="icd10")
    parsed = parse_config_args([settings.to_node_config()])
    assert node.is_deployed(parsed)
    assert node.from_node_config(parsed) == dataclasses.replace(
        settings, data_path=(tmp_path / "d.jsonl").resolve(),
        state_dir=(tmp_path / "state").resolve())
    assert SiloProfile.from_node_config(parsed) == profile  # what the ClientApp reads
    plain = node.from_node_config(parse_config_args([node.NodeSettings(
        "h2", tmp_path / "d.jsonl", tmp_path / "s", 8.0, 1e-5).to_node_config()]))
    assert (plain.profile, plain.text_column, plain.label_column) == (None, "text", "label")
    assert (plain.max_steps, plain.importance_queries, plain.public_size) == (None, 0, None)
    with pytest.raises(node.NodeConfigError, match="state-dir"):
        node.from_node_config({"silo-id": "x", "data-path": "/d"})
    with pytest.raises(node.NodeConfigError, match="--epsilon EPS --delta DELTA"):
        node.from_node_config({"silo-id": "x", "data-path": "/d", "state-dir": "/s"})
    with pytest.raises(node.NodeConfigError, match="epsilon"):
        node.NodeSettings("x", Path("d"), Path("s"), epsilon=0.0, delta=1e-5)


def test_run_config_text_round_trips_and_refuses_unknown_keys(tmp_path):
    cfg = build_config({"target-epsilon": "inf", "lora-ranks": "4,2", "num-server-rounds": 3},
                       tmp_path / "out", resume=True)
    parsed = parse_config_args([run_config_arg(cfg)])
    assert RunConfig.from_mapping(parsed) == cfg
    assert cfg.resume and not cfg.private and Path(cfg.out_dir).is_absolute()
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        build_config({"nope": 1}, tmp_path, resume=False)


def test_commands_are_secure_unless_explicitly_insecure(tmp_path):
    certs.create_material(tmp_path / "c", ["127.0.0.1"], ["s"])
    secure = superlink_command(CoordinatorSettings(tmp_path / "st", tmp_path / "c"))
    assert "--enable-supernode-auth" in secure and "--ssl-certfile" in secure
    assert "--insecure" not in secure and "--database" in secure
    with pytest.raises(DeployError, match="--insecure"):
        superlink_command(CoordinatorSettings(tmp_path / "st", None))
    assert "--insecure" in superlink_command(CoordinatorSettings(tmp_path / "st",
                                                                 insecure=True))
    with pytest.raises(DeployError, match="--ca"):
        Connection("127.0.0.1:9093", None)
    with pytest.raises(DeployError, match="HOST:PORT"):
        Connection("127.0.0.1", None, insecure=True)
    agent = supernode_command(AgentSettings(
        Connection("127.0.0.1:9093", tmp_path / "c" / "ca.crt"),
        tmp_path / "c/silos/s/node.key",
        node.NodeSettings("s", tmp_path / "d.jsonl", tmp_path / "state", 8.0, 1e-5)))
    assert "--root-certificates" in agent and "--auth-supernode-private-key" in agent
    assert "--insecure" not in agent


def test_kept_reply_answers_only_the_same_request(tmp_path):
    reply = TrainReply(silo_id="a", num_examples=10, base_version=1, steps=5,
                       epsilon=1.5, delta=1e-5, epsilon_limit=8.0, noise_multiplier=1.1,
                       ledger_head="ab" * 32, arrays={"m.lora_A": np.arange(6, dtype=np.float32
                                                                  ).reshape(2, 3)})
    replay.save_reply(tmp_path, "fed-1", 2, ["f1"], reply)
    kept = replay.load_reply(tmp_path, "fed-1", 2, ["f1"])
    assert kept == reply  # every field but the arrays, compared below
    assert np.array_equal(kept.arrays["m.lora_A"], reply.arrays["m.lora_A"])
    assert replay.load_reply(tmp_path, "fed-1", 3, ["f1"]) is None
    assert replay.load_reply(tmp_path, "fed-2", 2, ["f1"]) is None
    assert replay.load_reply(tmp_path, "fed-1", 2, ["other"]) is None
    assert replay.load_reply(tmp_path / "none", "fed-1", 2, ["f1"]) is None
