"""What the operator registered about each silo at enrolment (docs/architecture.md,
"Trust boundary").

`silotune coordinator register-silo node.pub --name a [--examples N] [--ledger-key K]`
registers the silo's node key with Flower (under the name ``a``) and records here what a
reply cannot be trusted to say about itself:

- ``examples``: the silo's size as agreed with the operator and public by declaration;
  the silo's aggregation weight, whatever a reply claims;
- ``ledger_key``: the silo's ledger public key (raw Ed25519, hex), pinned, so that the
  coordinator and `silotune audit` check ledger heads against the key of enrolment, not
  against whichever key signed the ledger's first entry.

The coordinator process passes the file's path to its ServerApps in the environment
variable `REGISTRY_ENV` (not the run config: whoever submits a run must not choose it).
A simulation has no registry (`SiloRegistry()`): silos are then weighed by the sizes
they declare, or equally.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from silotune.files import atomic_write_json

REGISTRY_ENV = "SILOTUNE_SILO_REGISTRY"
FILE_NAME = "silos.json"
VERSION = 1


class RegistryError(ValueError):
    """The registry file or an entry for it is malformed."""


@dataclass(frozen=True)
class RegisteredSilo:
    """One silo's enrolment record."""

    examples: int | None = None  # registered public size: the aggregation weight
    ledger_key: str | None = None  # raw Ed25519 ledger public key, hex

    def __post_init__(self) -> None:
        if self.examples is not None and (isinstance(self.examples, bool) or not isinstance(
                self.examples, int) or self.examples <= 0):
            raise RegistryError(f"examples {self.examples!r} is not a positive integer")
        if self.ledger_key is not None:
            public_key_from_hex(self.ledger_key)


@dataclass(frozen=True)
class SiloRegistry:
    """Enrolment records by silo name (the name the node key was registered under)."""

    silos: Mapping[str, RegisteredSilo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "silos", MappingProxyType(dict(self.silos)))

    def __bool__(self) -> bool:
        return bool(self.silos)

    def get(self, name: str) -> RegisteredSilo | None:
        return self.silos.get(name)

    def with_silo(self, name: str, silo: RegisteredSilo) -> SiloRegistry:
        return SiloRegistry({**self.silos, name: silo})

    def to_json(self) -> dict:
        return {"version": VERSION, "silos": {
            n: {"examples": s.examples, "ledger_key": s.ledger_key}
            for n, s in sorted(self.silos.items())}}

    @classmethod
    def from_json(cls, data: object) -> SiloRegistry:
        if not isinstance(data, dict) or data.get("version") != VERSION \
                or not isinstance(data.get("silos"), dict):
            raise RegistryError(f"not a version-{VERSION} silo registry")
        silos = {}
        for name, entry in data["silos"].items():
            if not isinstance(entry, dict) or set(entry) - {"examples", "ledger_key"}:
                raise RegistryError(f"silo {name!r}: malformed entry {entry!r}")
            try:
                silos[str(name)] = RegisteredSilo(**entry)
            except RegistryError as err:
                raise RegistryError(f"silo {name!r}: {err}") from err
        return cls(silos)

    @classmethod
    def load(cls, path: Path) -> SiloRegistry:
        """The registry at `path`; empty when the file does not exist yet."""
        if not path.exists():
            return cls()
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            raise RegistryError(f"silo registry {path}: {err}; fix or re-register the "
                                "silos with `silotune coordinator register-silo`") from err

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


def from_environment() -> SiloRegistry:
    """The registry the coordinator process named in `REGISTRY_ENV`, or an empty one."""
    path = os.environ.get(REGISTRY_ENV)
    return SiloRegistry.load(Path(path)) if path else SiloRegistry()


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    """A raw Ed25519 public key from its hex (what the registry stores)."""
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text))
    except ValueError as err:
        raise RegistryError(f"ledger key {text[:20]!r}...: not a raw Ed25519 public key "
                            "in hex") from err


def ledger_key_hex(path: Path) -> str:
    """The hex of the Ed25519 public key in `path`: a PEM public key, or the raw key in
    hex (as `silotune agent --show-ledger-key` prints it)."""
    if not path.is_file():
        raise RegistryError(f"ledger key file {path} does not exist; the silo admin sends "
                            "it (the agent prints it at start)")
    data = path.read_bytes().strip()
    if data.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise RegistryError(f"{path}: not an Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw,
                                serialization.PublicFormat.Raw).hex()
    text = data.decode("ascii", "replace")
    public_key_from_hex(text)
    return text
