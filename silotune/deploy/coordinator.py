"""`silotune coordinator`: the consortium's Flower SuperLink, secure by default.

Starts ``flower-superlink`` with

- TLS (the CA, certificate and key made by ``silotune certs --host ...``),
- SuperNode authentication (only silos whose public key was registered may join:
  ``silotune coordinator register-silo node.pub``),
- a persistent SQLite state database in the state directory (runs and registered
  nodes survive a restart; docs/flower.md §7.6),
- runtime dependency installation off: the ServerApp runs in this environment.

Without certificates it refuses to start, unless ``--insecure`` is given; then it warns
loudly and runs without TLS and without node authentication (Flower refuses node
authentication without TLS), which is only fit for a test on one machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from silotune.deploy import certs
from silotune.deploy.connection import (
    CONNECTION,
    Connection,
    DeployError,
    flower_env,
    flower_tool,
    run_flwr,
    write_flwr_home,
)
from silotune.files import private_dir
from silotune.server.registry import (
    FILE_NAME,
    REGISTRY_ENV,
    RegisteredSilo,
    SiloRegistry,
    ledger_key_hex,
)

DEFAULT_PORT = 9093
INSECURE_WARNING = """
!!! silotune coordinator is running INSECURE (--insecure) !!!
!!! no TLS: adapters, metrics and ledger hashes travel in clear text;          !!!
!!! no node authentication: any process that reaches this port can join.      !!!
!!! Use this only for a test on one machine. Create certificates with         !!!
!!!   silotune certs --out CERTS --host <this host's name or IP>              !!!
!!! and start with --certs CERTS instead.                                      !!!
"""


@dataclass(frozen=True)
class CoordinatorSettings:
    """Where the coordinator keeps its state, its TLS material and where it listens."""

    state_dir: Path
    certs_dir: Path | None = None
    host: str = "127.0.0.1"  # 0.0.0.0 to accept silos from other machines
    port: int = DEFAULT_PORT
    insecure: bool = False

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr"

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def registry(self) -> Path:
        """What the operator registered about each silo (silotune/server/registry.py)."""
        return self.state_dir / FILE_NAME

    @property
    def connection(self) -> Connection:
        """How commands on this machine reach the coordinator."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        ca = None if self.insecure or self.certs_dir is None else self.certs_dir / certs.CA_CERT
        return Connection(f"{host}:{self.port}", ca, self.insecure)


def tls_files(settings: CoordinatorSettings) -> tuple[Path, Path, Path]:
    """(CA, certificate, key) in the certs folder; `DeployError` names what is missing."""
    if settings.certs_dir is None:
        raise DeployError("no TLS certificates given: create them with `silotune certs "
                          "--out CERTS --host <host the silos dial>` and pass --certs CERTS "
                          "(or --insecure for a test without TLS and node authentication)")
    files = tuple(settings.certs_dir / n for n in (certs.CA_CERT, certs.SERVER_CERT,
                                                   certs.SERVER_KEY))
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise DeployError(f"missing TLS files {', '.join(missing)}; create them with "
                          f"`silotune certs --out {settings.certs_dir} --host <host the silos "
                          "dial>` (or pass --insecure for a test without TLS)")
    return files[0], files[1], files[2]


def superlink_command(settings: CoordinatorSettings) -> list[str]:
    """The ``flower-superlink`` command line for `settings` (raises when not secure and
    not explicitly insecure)."""
    cmd = [flower_tool("flower-superlink"), "--database", str(settings.database),
           "--host", settings.host, "--port", str(settings.port),
           "--disable-runtime-dependency-installation"]
    if settings.insecure:
        return [*cmd, "--insecure"]
    ca, cert, key = tls_files(settings)
    return [*cmd, "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
            "--ssl-keyfile", str(key), "--enable-supernode-auth"]


def start(settings: CoordinatorSettings) -> int:
    """Run the coordinator in the foreground until it stops or is signalled."""
    cmd = superlink_command(settings)  # refuses before anything is created
    private_dir(settings.state_dir)  # 0700: database and registry
    write_flwr_home(settings.flwr_home, settings.connection)
    if settings.insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
    print(f"[coordinator] state {settings.database}, listening on {settings.host}:"
          f"{settings.port} ({'INSECURE' if settings.insecure else 'TLS + node auth'})",
          flush=True)
    env = {**flower_env(settings.flwr_home), REGISTRY_ENV: str(settings.registry.resolve())}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum: int, _frame: FrameType | None) -> None:
        try:  # stop Flower's whole process group (SuperLink, SuperExec, ServerApps)
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        code = proc.wait()
    finally:
        forward(signal.SIGTERM, None)
    return 0 if code in (-signal.SIGTERM, -signal.SIGINT) else code  # stopped on request


def register_silo(settings: CoordinatorSettings, public_key: Path, name: str,
                  examples: int | None = None, ledger_key: Path | None = None) -> int:
    """Register a silo's node public key with the running coordinator under `name` (the
    silo id its agent must claim), and record its public size and ledger key."""
    if not public_key.is_file():
        raise DeployError(f"public key {public_key} does not exist; the silo admin sends "
                          "node.pub from `silotune certs --silo ID`")
    if settings.insecure:
        raise DeployError("an insecure coordinator has no node authentication; there is "
                          "nothing to register")
    if examples is not None and examples <= 0:
        raise DeployError(f"--examples {examples}: a silo's registered size must be > 0")
    entry = RegisteredSilo(examples, ledger_key_hex(ledger_key) if ledger_key else None)
    registry = SiloRegistry.load(settings.registry)  # refuses a corrupt file first
    home = write_flwr_home(settings.flwr_home, settings.connection)
    code = run_flwr(["supernode", "register", str(public_key), CONNECTION, "--name", name],
                    home).returncode
    if code == 0:
        registry.with_silo(name, entry).save(settings.registry)
    return code
