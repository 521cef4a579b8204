"""How the silos and the operator's `flwr` commands reach a deployed coordinator.

The coordinator listens twice (docs/flower.md §8): on the silos' address (``--host``/
``--port``, Fleet API only) and on the loopback operator port (``--operator-port``, every
API). `flwr run` and `flwr supernode register` find a SuperLink through a named
connection in ``$FLWR_HOME/config.toml`` (docs/flower.md §3). silotune writes that file
into a folder of its own (never the user's ``~/.flwr``) and runs `flwr` with
``FLWR_HOME`` pointing there, so that every command states its coordinator, CA and TLS
mode explicitly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CONNECTION = "silotune"  # the connection name silotune writes and uses
DEFAULT_PORT = 9093  # the silos' address (Fleet API only)
# The operator's loopback port (every API). Not 9094: that is the default local port of
# an agent's `flower-supernode`, which may run on the coordinator's machine.
DEFAULT_OPERATOR_PORT = 9095
OPERATOR_HOST = "127.0.0.1"


class DeployError(RuntimeError):
    """A deployment command cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class Connection:
    """A coordinator's address (``host:port``) and how to trust it."""

    address: str
    ca: Path | None  # the consortium CA certificate; None only with insecure
    insecure: bool = False

    def __post_init__(self) -> None:
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit():
            raise DeployError(f"coordinator address {self.address!r} must be HOST:PORT, "
                              "e.g. 127.0.0.1:9093 or coordinator.example.org:9093")
        if self.ca is None and not self.insecure:
            raise DeployError("no CA certificate given: pass --ca ca.crt (from `silotune "
                              "certs`), or --insecure for a test federation without TLS")
        if self.ca is not None and not self.insecure and not self.ca.is_file():
            raise DeployError(f"CA certificate {self.ca} does not exist; copy the "
                              "consortium's ca.crt here or pass --ca with its path")

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


def write_flwr_home(home: Path, conn: Connection) -> Path:
    """Write ``home/config.toml`` with one connection, `CONNECTION`; returns `home`."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f"default = {json.dumps(CONNECTION)}", "",
             f"[superlink.{CONNECTION}]", f"address = {json.dumps(conn.address)}"]
    if conn.insecure:
        lines.append("insecure = true")
    else:
        assert conn.ca is not None  # checked in Connection.__post_init__
        lines.append(f"root-certificates = {json.dumps(str(conn.ca.resolve()))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def flower_env(home: Path) -> dict[str, str]:
    """The environment for Flower processes: our FLWR_HOME, this venv's tools first on
    PATH, and no installation of runtime dependencies (docs/flower.md §3, "Two traps")."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(home.resolve())
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def flower_tool(name: str) -> str:
    """Path of a Flower command installed next to this Python (or on PATH)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` is not installed; install silotune (it depends on "
                          "flwr) in this environment")
    return found


def run_flwr(args: Sequence[str], home: Path, capture: bool = False,
             ) -> subprocess.CompletedProcess[str]:
    """Run ``flwr ARGS`` against the connection in `home`."""
    return subprocess.run([flower_tool("flwr"), *args], env=flower_env(home), text=True,
                          capture_output=capture, check=False)
