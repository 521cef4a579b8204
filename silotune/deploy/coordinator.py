"""`silotune coordinator`: the consortium's Flower SuperLink, secure by default.

Starts Flower's SuperLink through silotune's launcher (`silotune.deploy.superlink`), on
two listeners (docs/flower.md §8):

- the silos' address (``--host``/``--port``): the Fleet API only, request bodies capped
  (``--max-request-mib``); whoever reaches it can neither manage nodes nor start runs;
- the operator port (``--operator-port``, on 127.0.0.1 only): every API, used by
  `register_silo`, `silotune run` and the SuperExec. The operator's credential is a
  shell on this machine (or an SSH tunnel to the port);

and with

- TLS (the CA, certificate and key made by ``silotune certs --host ... --host
  127.0.0.1``),
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

from cryptography import x509

from silotune.deploy import certs
from silotune.deploy.connection import (
    CONNECTION,
    DEFAULT_OPERATOR_PORT,
    DEFAULT_PORT,
    OPERATOR_HOST,
    Connection,
    DeployError,
    flower_env,
    run_flwr,
    write_flwr_home,
)
from silotune.deploy.superlink import DEFAULT_MAX_REQUEST_MIB
from silotune.files import private_dir
from silotune.server.heads import HEADS_ENV
from silotune.server.registry import (
    FILE_NAME,
    REGISTRY_ENV,
    RegisteredSilo,
    SiloRegistry,
    ledger_key_hex,
)

INSECURE_WARNING = """
!!! silotune coordinator is running INSECURE (--insecure) !!!
!!! no TLS: adapters, metrics and ledger hashes travel in clear text;          !!!
!!! no node authentication: any process that reaches this port can join.      !!!
!!! Use this only for a test on one machine. Create certificates with         !!!
!!!   silotune certs --out CERTS --host <this host's name> --host 127.0.0.1   !!!
!!! and start with --certs CERTS instead.                                      !!!
"""


@dataclass(frozen=True)
class CoordinatorSettings:
    """Where the coordinator keeps its state, its TLS material and where it listens."""

    state_dir: Path
    certs_dir: Path | None = None
    host: str = "127.0.0.1"  # the silos' address; 0.0.0.0 for silos on other machines
    port: int = DEFAULT_PORT
    insecure: bool = False
    operator_port: int = DEFAULT_OPERATOR_PORT  # on 127.0.0.1 only
    max_request_mib: int = DEFAULT_MAX_REQUEST_MIB

    def __post_init__(self) -> None:
        for flag, port in (("--port", self.port), ("--operator-port", self.operator_port)):
            if not 1 <= port <= 65535:
                raise DeployError(f"{flag} {port} is not a port (1-65535)")
        if self.port == self.operator_port:
            raise DeployError(f"--port and --operator-port are both {self.port}: the silos' "
                              "address and the operator port must differ (defaults "
                              f"{DEFAULT_PORT} and {DEFAULT_OPERATOR_PORT})")
        if self.max_request_mib < 1:
            raise DeployError(f"--max-request-mib {self.max_request_mib} must be >= 1 "
                              f"(default {DEFAULT_MAX_REQUEST_MIB})")

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
        """How the operator's commands on this machine reach the coordinator: its
        operator port."""
        ca = None if self.insecure or self.certs_dir is None else self.certs_dir / certs.CA_CERT
        return Connection(f"{OPERATOR_HOST}:{self.operator_port}", ca, self.insecure)


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
                          f"dial> --host {OPERATOR_HOST}` (or pass --insecure for a test "
                          "without TLS)")
    _check_names_operator_host(files[1])
    return files[0], files[1], files[2]


def _check_names_operator_host(cert_path: Path) -> None:
    """The operator's commands and the SuperExec dial 127.0.0.1 and check that the
    certificate names it; refuse at start-up rather than fail every command later."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    if OPERATOR_HOST not in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}:
        raise DeployError(
            f"the coordinator certificate {cert_path} does not name {OPERATOR_HOST}, "
            f"where the operator port listens: move {certs.SERVER_CERT} and "
            f"{certs.SERVER_KEY} away and run `silotune certs --out {cert_path.parent} "
            f"--host <host the silos dial> --host {OPERATOR_HOST}` (the CA and silo keys "
            "are kept)")


def superlink_command(settings: CoordinatorSettings) -> list[str]:
    """The command line of silotune's SuperLink launcher for `settings` (raises when
    not secure and not explicitly insecure): Flower's ``--host``/``--port`` are the
    operator port, ``--fleet-host``/``--fleet-port`` the silos' address."""
    cmd = [sys.executable, "-m", "silotune.deploy.superlink",
           "--database", str(settings.database),
           "--host", OPERATOR_HOST, "--port", str(settings.operator_port),
           "--fleet-host", settings.host, "--fleet-port", str(settings.port),
           "--max-request-mib", str(settings.max_request_mib),
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
    print(f"[coordinator] state {settings.database}; silos' address {settings.host}:"
          f"{settings.port} (Fleet API only); operator port {OPERATOR_HOST}:"
          f"{settings.operator_port} ({'INSECURE' if settings.insecure else 'TLS + node auth'})",
          flush=True)
    env = {**flower_env(settings.flwr_home), REGISTRY_ENV: str(settings.registry.resolve()),
           HEADS_ENV: str(settings.state_dir.resolve() / "ledger-heads.json")}  # heads.py
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
