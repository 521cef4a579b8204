"""`silotune agent`: one silo's Flower SuperNode, next to the silo's private data.

Before starting ``flower-supernode`` the agent checks, with errors that name the flag to
fix (docs/flower.md §7.5):

1. its node private key exists and is an EC key Flower accepts (``--key``);
2. the CA certificate exists and is a certificate (``--ca``);
3. the coordinator is reachable: TCP connect, retried with exponential backoff, each
   attempt logged, giving up with a message after ``--max-attempts``;
4. the coordinator's TLS certificate verifies against the CA for the address dialled
   (a wrong CA or a certificate for another host name fails here, clearly);
5. the consortium's app-signing public key is pinned (``--app-key``), unless the silo
   admin explicitly allows any app (``--allow-unsigned-apps``).

Then it runs the SuperNode with the silo's node config (client/node.py: data, budget,
data columns and the optional FedPipe resource profile) and watches its log: a
SuperNode that fails to activate although the coordinator is reachable and trusted was
refused by node authentication, so the agent stops with "register this key" instead of
Flower's bare exit code 305.

Only signed apps run: the SuperNode's PATH starts with a gate folder in the state
directory whose ``flwr-clientapp`` verifies each app's signature before any of its code
is installed or imported (deploy/verified_clientapp.py, docs/flower.md §8).

No orphan SuperNode: it runs in a process group of its own, which the agent signals on
SIGTERM/SIGINT/SIGHUP and when it exits; and the kernel sends it SIGTERM when the agent
dies, even by SIGKILL (``prctl(PR_SET_PDEATHSIG)``, Linux). Its SuperExec and ClientApp
processes follow their parent (they watch ``--parent-pid``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from silotune.client.local import LEDGER_KEY_FILE
from silotune.client.node import NodeSettings
from silotune.deploy import app_signing, certs
from silotune.deploy.connection import Connection, DeployError, flower_env, flower_tool
from silotune.deploy.verified_clientapp import write_gate
from silotune.files import private_dir
from silotune.ml.precision import PRECISIONS
from silotune.planning.profiles import RESOURCE_KEYS, SiloProfile
from silotune.privacy.ledger import load_or_create_signing_key, public_key_hex

Log = Callable[[str], None]
CONNECT_TIMEOUT_SECONDS = 5.0
MAX_BACKOFF_SECONDS = 30.0
# What flower-supernode 1.41 prints once connected, and when the SuperLink refuses it.
_ACTIVATED_MARKER = "SuperNode ID:"
_REFUSED_MARKER = "Failed to activate SuperNode"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
GATE_DIR = "app-gate"  # in the state directory: the verifying flwr-clientapp


class AgentError(DeployError):
    """The agent cannot (or can no longer) serve its silo; the message says why."""


@dataclass(frozen=True)
class AgentSettings:
    """One silo agent: where the coordinator is, its credentials and its node config."""

    connection: Connection
    key: Path | None  # the silo's node private key (None only with insecure)
    node: NodeSettings
    max_attempts: int = 8  # connection attempts before giving up
    backoff_seconds: float = 1.0  # first wait; doubles up to MAX_BACKOFF_SECONDS
    runtime_port: int | None = None  # local SuperNode <-> ClientApp port (default 9094)
    app_key: Path | None = None  # the consortium's app-signing.pub the silo pins
    allow_unsigned_apps: bool = False  # run ANY app the coordinator sends (explicit)


def preflight(settings: AgentSettings, log: Log = print) -> None:
    """Checks 1-5 of the module docstring; raises `AgentError`, `certs.CertsError` or
    `app_signing.AppSignatureError`."""
    check_app_key(settings)
    conn = settings.connection
    if not conn.insecure:
        if settings.key is None:
            raise AgentError("no node private key given: pass --key node.key (from "
                             "`silotune certs --silo ID`), registered with the coordinator")
        certs.load_node_key(settings.key)
        assert conn.ca is not None  # Connection requires it unless insecure
        certs.load_ca(conn.ca)
    if not settings.node.data_path.is_file():
        raise AgentError(f"silo data {settings.node.data_path} does not exist; pass --data "
                         "with the silo's training file (.jsonl, .json, .csv or .parquet)")
    private_dir(settings.node.state_dir)  # 0700: the silo's ledger and keys
    wait_for_coordinator(settings, log)
    if not conn.insecure:
        check_tls(conn)


def check_app_key(settings: AgentSettings) -> None:
    """Check 5: a usable pinned key, or the explicit opt-out (not both)."""
    if settings.app_key is None:
        if not settings.allow_unsigned_apps:
            raise AgentError("--app-key is required: pass the consortium's app-signing.pub "
                             "(from the operator's `silotune certs --app-signing`), so that "
                             "this silo runs only apps the operator signed; or, for a test "
                             "federation only, --allow-unsigned-apps to run ANY app the "
                             "coordinator sends next to this silo's data")
        return
    if settings.allow_unsigned_apps:
        raise AgentError("--app-key and --allow-unsigned-apps exclude each other: pass one")
    app_signing.load_public_key(settings.app_key)


def wait_for_coordinator(settings: AgentSettings, log: Log = print) -> None:
    """TCP-connect to the coordinator, with exponential backoff; give up after
    `settings.max_attempts` attempts."""
    conn, wait = settings.connection, settings.backoff_seconds
    for attempt in range(1, settings.max_attempts + 1):
        try:
            with socket.create_connection((conn.host, conn.port),
                                          timeout=CONNECT_TIMEOUT_SECONDS):
                return
        except OSError as err:
            reason = err.strerror or type(err).__name__
            if attempt == settings.max_attempts:
                raise AgentError(
                    f"coordinator {conn.address} unreachable after {attempt} attempts "
                    f"({reason}); check --coordinator, that `silotune coordinator` runs "
                    "there and listens on a reachable --host, and firewalls") from err
            log(f"[agent] coordinator {conn.address} unreachable ({reason}); attempt "
                f"{attempt}/{settings.max_attempts}, retrying in {wait:.0f} s")
            time.sleep(wait)
            wait = min(MAX_BACKOFF_SECONDS, wait * 2)


def check_tls(conn: Connection) -> None:
    """Verify the coordinator's certificate against the CA for the address dialled."""
    assert conn.ca is not None
    context = ssl.create_default_context(cafile=str(conn.ca))
    try:
        with socket.create_connection((conn.host, conn.port),
                                      timeout=CONNECT_TIMEOUT_SECONDS) as sock, \
                context.wrap_socket(sock, server_hostname=conn.host):
            return
    except ssl.SSLCertVerificationError as err:
        raise AgentError(
            f"the coordinator's TLS certificate at {conn.address} does not verify against "
            f"--ca {conn.ca} ({err.verify_message}): use the consortium's ca.crt, and "
            "make sure the coordinator's certificate names this address (`silotune certs "
            "--host`)") from err
    except ssl.SSLError as err:
        raise AgentError(f"TLS handshake with {conn.address} failed ({err.reason}); is the "
                         "coordinator running with TLS (not --insecure)?") from err
    except OSError as err:
        raise AgentError(f"coordinator {conn.address} closed the connection during the "
                         f"TLS check ({err})") from err


def supernode_command(settings: AgentSettings) -> list[str]:
    """The ``flower-supernode`` command line for `settings`."""
    conn = settings.connection
    cmd = [flower_tool("flower-supernode"), "--superlink", conn.address,
           "--node-config", settings.node.to_node_config()]
    if settings.runtime_port is not None:
        cmd += ["--port", str(settings.runtime_port)]
    if conn.insecure:
        return [*cmd, "--insecure"]
    assert conn.ca is not None and settings.key is not None
    return [*cmd, "--root-certificates", str(conn.ca),
            "--auth-supernode-private-key", str(settings.key)]


def ledger_key(state_dir: Path) -> str:
    """The hex of the silo's ledger public key (the key is created on first use): what
    its admin sends the coordinator's operator for `register-silo --ledger-key`, so that
    the coordinator and auditors check its ledger against it (docs/privacy.md)."""
    return public_key_hex(load_or_create_signing_key(state_dir / LEDGER_KEY_FILE))


def run(settings: AgentSettings, log: Log = print) -> int:
    """Preflight, then run the SuperNode until it stops; returns its exit code."""
    preflight(settings, log)
    node = settings.node
    log(f"[agent] silo {node.silo_id}: ledger key {ledger_key(node.state_dir)} (send it to "
        "the coordinator's operator: `silotune coordinator register-silo --ledger-key`)")
    log(f"[agent] silo {node.silo_id}: data {node.data_path}, state {node.state_dir}, "
        f"policy epsilon <= {node.epsilon}, delta {node.delta:g}, "
        f"max steps {node.max_steps or 'no cap'}, importance queries "
        f"{node.importance_queries}, "
        f"coordinator {settings.connection.address}"
        + (" INSECURE" if settings.connection.insecure else " (TLS, node key)"))
    log(f"[agent] silo {node.silo_id}: columns text={node.text_column!r} "
        f"label={node.label_column!r}, privacy unit {node.policy.privacy_unit!r}; "
        f"{describe_profile(node.profile)}")
    log(f"[agent] silo {node.silo_id}: {describe_apps(settings)}")
    home = node.state_dir / "flwr"
    home.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.Popen(supernode_command(settings),
                                env=supernode_env(settings, home), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                preexec_fn=_die_with_parent(os.getpid()))
    except subprocess.SubprocessError as err:
        raise AgentError(f"could not start flower-supernode bound to this agent ({err}); "
                         "the kernel refused prctl(PR_SET_PDEATHSIG)") from err

    def forward(signum: int, _frame: FrameType | None) -> None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    seen = _LogWatch()
    reader = threading.Thread(target=seen.follow, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        code = proc.wait()
    finally:  # the SuperNode's own children (SuperExec) outlive it otherwise
        forward(signal.SIGTERM, None)
    reader.join(timeout=10)
    if code != 0 and seen.refused:
        raise AgentError(_refused_message(settings))
    return code


def supernode_env(settings: AgentSettings, home: Path) -> dict[str, str]:
    """Flower's environment for the SuperNode, with the app gate first on PATH when an
    app key is pinned (its ``flwr-clientapp`` verifies every app before installing it)."""
    env = flower_env(home)
    if settings.app_key is not None:
        gate = write_gate(settings.node.state_dir / GATE_DIR, settings.app_key)
        env["PATH"] = os.pathsep.join([str(gate.resolve()), env["PATH"]])
    return env


def describe_apps(settings: AgentSettings) -> str:
    """One line on which apps the silo runs, for the agent's log."""
    if settings.app_key is None:
        return ("runs ANY app the coordinator sends (--allow-unsigned-apps): no signature "
                "is checked")
    key = app_signing.load_public_key(settings.app_key)
    return (f"runs only apps signed with app-signing key {app_signing.key_id(key)} "
            f"({settings.app_key})")


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when the agent dies, also
    by SIGKILL (Linux only; elsewhere None). The fork happens in the agent's main thread,
    which lives as long as the agent; libc is loaded before the fork, and a parent gone
    before the call is caught by the pid check."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)

    def arm() -> None:
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent:
            os._exit(1)

    return arm


def describe_profile(profile: SiloProfile | None) -> str:
    """One line on the silo's declared FedPipe resource profile, for the agent's log."""
    if profile is None:
        return ("no resource profile declared (a run with profiles = \"node\" needs "
                + ", ".join(f"--{key}" for key in RESOURCE_KEYS) + ")")
    precisions = ("any" if profile.precisions is None
                  else ",".join(profile.allowed_precisions(tuple(PRECISIONS))))
    return (f"resource profile '{profile.name}': {profile.memory_gb:g} GB, "
            f"{profile.gflops:g} GFLOP/s, up {profile.upload_mbps:g} / down "
            f"{profile.download_mbps:g} Mbit/s, {profile.round_seconds:g} s per round, "
            f"base precisions {precisions}")


class _LogWatch:
    """Echoes the SuperNode's log and notes whether it connected or was refused."""

    def __init__(self) -> None:
        self.activated = self.refused = False

    def follow(self, stream: IO[str] | None) -> None:
        for line in stream or ():
            sys.stdout.write(line)
            sys.stdout.flush()
            self.activated = self.activated or _ACTIVATED_MARKER in line
            self.refused = self.refused or (not self.activated and _REFUSED_MARKER in line)


def _refused_message(settings: AgentSettings) -> str:
    if settings.connection.insecure:
        return (f"the coordinator {settings.connection.address} refused this SuperNode; "
                "is it running with TLS (then drop --insecure and pass --ca and --key)?")
    return (f"the coordinator {settings.connection.address} is reachable and its certificate "
            f"verifies, but it refused this silo's key {settings.key}: the key is not "
            "registered. Send node.pub to the coordinator's operator, who runs `silotune "
            "coordinator register-silo node.pub`, then start the agent again")
