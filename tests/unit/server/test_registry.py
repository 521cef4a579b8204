"""The operator's enrolment records (silotune/server/registry.py)."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from silotune.server.registry import (
    REGISTRY_ENV,
    RegisteredSilo,
    RegistryError,
    SiloRegistry,
    from_environment,
    ledger_key_hex,
)


def _public_hex() -> str:
    return Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def test_a_registry_round_trips_through_its_file_and_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "silos.json"
    key = _public_hex()
    SiloRegistry().with_silo("a", RegisteredSilo(60, key)).with_silo(
        "b", RegisteredSilo()).save(path)
    monkeypatch.setenv(REGISTRY_ENV, str(path))
    registry = from_environment()
    assert registry.get("a") == RegisteredSilo(60, key)
    assert registry.get("b") == RegisteredSilo() and registry.get("c") is None
    monkeypatch.delenv(REGISTRY_ENV)
    assert not from_environment()  # a simulation: no registry


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"examples": 0}, "positive integer"),
    ({"examples": 1e15}, "positive integer"),
    ({"examples": True}, "positive integer"),
    ({"ledger_key": "zz"}, "raw Ed25519"),
    ({"weight": 3}, "malformed entry"),
])
def test_a_malformed_registry_is_refused_naming_the_silo(tmp_path, entry, fragment):
    path = tmp_path / "silos.json"
    path.write_text(json.dumps({"version": 1, "silos": {"a": entry}}))
    with pytest.raises(RegistryError, match=fragment) as err:
        SiloRegistry.load(path)
    assert "'a'" in str(err.value) and "register-silo" in str(err.value)


def test_ledger_keys_are_read_from_pem_or_hex(tmp_path):
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw).hex()
    pem = tmp_path / "ledger.pem"
    pem.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "ledger.hex").write_text(raw + "\n")
    assert ledger_key_hex(pem) == raw == ledger_key_hex(tmp_path / "ledger.hex")
    with pytest.raises(RegistryError, match="does not exist"):
        ledger_key_hex(tmp_path / "missing")
