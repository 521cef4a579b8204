"""Arguments of the deployment jobs: certs, coordinator, agent, run (thin wrappers)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from silotune.client.node import NodeConfigError, NodeSettings
from silotune.config import ConfigError
from silotune.deploy.app_signing import AppSignatureError
from silotune.deploy.certs import CertsError
from silotune.deploy.connection import (
    DEFAULT_OPERATOR_PORT,
    DEFAULT_PORT,
    OPERATOR_HOST,
    Connection,
    DeployError,
)
from silotune.deploy.superlink import DEFAULT_MAX_REQUEST_MIB
from silotune.files import PRIVATE_UMASK
from silotune.ml.precision import PRECISIONS
from silotune.planning.profiles import (
    DOWNLOAD_MBPS,
    GFLOPS,
    MEMORY_GB,
    PROFILE_NAME,
    PROFILE_PRECISIONS,
    RESOURCE_KEYS,
    ROUND_SECONDS,
    UPLOAD_MBPS,
    ProfileError,
    SiloProfile,
)

# `silotune agent` flags of a FedPipe resource profile: --KEY, one per node-config key.
_PROFILE_HELP = {
    MEMORY_GB: "training memory limit in GB",
    GFLOPS: "sustained training throughput in GFLOP/s",
    UPLOAD_MBPS: "upload bandwidth to the coordinator in Mbit/s",
    DOWNLOAD_MBPS: "download bandwidth from the coordinator in Mbit/s",
    ROUND_SECONDS: "time budget of one round (compute + transfer) in seconds",
}


def _trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", type=Path, metavar="CA_CRT",
                   help="the consortium CA certificate (ca.crt from `silotune certs`)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS (only for a coordinator started with --insecure)")


def add_deploy_parsers(sub: Any) -> None:
    """Add the certs, coordinator, agent and run sub-commands to `sub`."""
    c = sub.add_parser(
        "certs", help="create the CA, the coordinator's TLS certificate, silo key pairs and "
        "the app-signing key pair",
        description="Create TLS, node-authentication and app-signing material with safe "
        "permissions (private keys 0600). Existing files are kept, never overwritten.")
    c.add_argument("--out", type=Path, required=True, help="folder for the material")
    c.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a host name or IP the silos dial to reach the coordinator "
                   "(repeat for several); creates the CA and coordinator certificate")
    c.add_argument("--silo", action="append", default=[], metavar="ID",
                   help="create silos/ID/node.key and node.pub (repeat for several)")
    c.add_argument("--app-signing", action="store_true",
                   help="create app-signing.key (the operator's, for `silotune run "
                   "--app-key`; keep it off the coordinator) and app-signing.pub (for "
                   "every silo's `silotune agent --app-key`)")

    co = sub.add_parser(
        "coordinator", help="start the coordinator service (Flower SuperLink with TLS, node "
        "authentication and a persistent state database)",
        description="Start the coordinator (Flower SuperLink) in the foreground. Refuses "
        "to start without TLS certificates unless --insecure is given. It listens twice: "
        "the silos' address (--host/--port) serves only the silos' Fleet API; the operator "
        f"port ({OPERATOR_HOST}:--operator-port) serves everything, and only a user of "
        "this machine (or an SSH tunnel to it) reaches it: register-silo and `silotune "
        "run` go there.")
    co.add_argument("--state-dir", type=Path, default=Path("coordinator-state"),
                    help="state database and Flower config (%(default)s)")
    co.add_argument("--certs", type=Path, help="folder made by `silotune certs --host ... "
                    f"--host {OPERATOR_HOST}`")
    co.add_argument("--host", default="127.0.0.1",
                    help="the silos' address to listen on; 0.0.0.0 for silos on other "
                    "machines (%(default)s)")
    co.add_argument("--port", type=int, default=DEFAULT_PORT,
                    help="the silos' port (Fleet API only) (%(default)s)")
    co.add_argument("--operator-port", type=int, default=DEFAULT_OPERATOR_PORT,
                    help=f"the operator port on {OPERATOR_HOST} (every API: node "
                    "registration, runs) (%(default)s)")
    co.add_argument("--max-request-mib", type=int, default=DEFAULT_MAX_REQUEST_MIB,
                    help="largest request body accepted on the silos' port, in MiB "
                    "(%(default)s)")
    co.add_argument("--insecure", action="store_true",
                    help="run WITHOUT TLS and node authentication (tests only; warns)")
    co_sub = co.add_subparsers(dest="action", metavar="ACTION")
    reg = co_sub.add_parser("register-silo", help="allow a silo's node key to join")
    reg.add_argument("public_key", type=Path, metavar="PUBKEY", help="the silo's node.pub")
    reg.add_argument("--name", required=True,
                     help="the silo's id: its agent must claim this --silo-id")
    reg.add_argument("--examples", type=int, default=None,
                     help="the silo's size as agreed with it, public by declaration: its "
                     "aggregation weight whatever its replies claim (default: equal weights)")
    reg.add_argument("--ledger-key", type=Path, default=None,
                     help="the silo's ledger public key (the agent prints it at start): "
                     "pinned, so ledgers re-signed with another key are refused")

    a = sub.add_parser(
        "agent", help="run a silo client agent (Flower SuperNode) next to the silo's "
        "private data",
        description="Run one silo's agent. Checks the key, the CA and the coordinator "
        "(with retries and backoff) before starting the Flower SuperNode.")
    a.add_argument("--coordinator", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT",
                   help="the coordinator's silos' address (its --host/--port) (%(default)s)")
    _trust_args(a)
    a.add_argument("--key", type=Path, help="the silo's node private key (node.key)")
    a.add_argument("--app-key", type=Path, metavar="APP_SIGNING_PUB",
                   help="the consortium's app-signing.pub: the silo runs only apps signed "
                   "with it (required unless --allow-unsigned-apps)")
    a.add_argument("--allow-unsigned-apps", action="store_true",
                   help="run ANY app the coordinator sends, next to the silo's data (test "
                   "federations only)")
    a.add_argument("--silo-id", required=True, help="the silo's name in metrics and ledgers")
    a.add_argument("--data", type=Path, required=True,
                   help="the silo's private training data (.jsonl/.json/.csv/.parquet)")
    a.add_argument("--state-dir", type=Path, required=True,
                   help="the silo's ledger, signing key and last reply")
    a.add_argument("--show-ledger-key", action="store_true",
                   help="print the silo's ledger public key (hex; created if needed) and "
                   "exit; needs only --state-dir. Send it to the coordinator's operator "
                   "for `register-silo --ledger-key`")
    policy = a.add_argument_group(
        "privacy policy (the silo's own; a run can only ask for less)")
    policy.add_argument("--epsilon", type=float, required=True,
                        help="lifetime epsilon limit of this silo's data (required; 'inf' "
                        "makes a non-private silo)")
    policy.add_argument("--delta", type=float, required=True,
                        help="the silo's DP delta (required), e.g. 1e-5")
    policy.add_argument("--max-steps", type=int, default=None,
                        help="most DP-SGD steps trained in one federation (default: no cap)")
    policy.add_argument("--importance-queries", type=int, default=0,
                        help="most FedPipe importance queries answered in the silo's life, "
                        "each a DP release charged to its ledger (%(default)s: none)")
    policy.add_argument("--public-size", type=int, default=None,
                        help="a dataset size you declare public: the silo's aggregation "
                        "weight (default: none; the exact size never leaves the silo and "
                        "the coordinator weighs such silos equally)")
    policy.add_argument("--privacy-unit-column", default=None, metavar="COLUMN",
                        help="a column naming each row's privacy unit, e.g. a patient id: "
                        "all rows of a unit are sampled and clipped together and epsilon "
                        "holds per unit (default: one row is the unit)")
    a.add_argument("--text-column", default="text",
                   help="the column of the silo's data holding the text (%(default)s)")
    a.add_argument("--label-column", default="label",
                   help="the column of the silo's data holding the label (%(default)s)")
    fedpipe = a.add_argument_group(
        "resource profile (FedPipe, run config profiles = \"node\")",
        "what this silo can spend on a round; give all five numbers or none")
    for key in RESOURCE_KEYS:
        fedpipe.add_argument(f"--{key}", type=float, metavar="N", help=_PROFILE_HELP[key])
    fedpipe.add_argument(f"--{PROFILE_PRECISIONS}", metavar="LIST",
                         help="base precisions the silo can train at, comma separated "
                         f"(from {', '.join(PRECISIONS)}; default: all)")
    fedpipe.add_argument(f"--{PROFILE_NAME}", metavar="LABEL",
                         help="a label for the profile in plans and metrics")
    a.add_argument("--max-attempts", type=int, default=8,
                   help="connection attempts before giving up (%(default)s)")
    a.add_argument("--backoff", type=float, default=1.0,
                   help="first wait between attempts in seconds, doubling (%(default)s)")
    a.add_argument("--runtime-port", type=int,
                   help="local SuperNode-ClientApp port, unique per agent on one machine "
                   "(Flower's default 9094)")

    r = sub.add_parser(
        "run", help="submit a federation run to a deployed coordinator and stream its "
        "progress",
        description="Submit the silotune app to a coordinator with the given run config "
        "(keys of [tool.flwr.app.config], e.g. -c num-server-rounds=3) and stream its "
        "log. OUT is a folder on the coordinator's machine. Runs are submitted through the "
        "coordinator's operator port: run this on the coordinator's machine, or through "
        f"an SSH tunnel to it (ssh -L {DEFAULT_OPERATOR_PORT}:{OPERATOR_HOST}:"
        f"{DEFAULT_OPERATOR_PORT} coordinator-host).")
    where = r.add_mutually_exclusive_group()
    where.add_argument("--operator-port", type=int, default=DEFAULT_OPERATOR_PORT,
                       help=f"the coordinator's operator port, reached at {OPERATOR_HOST} "
                       "(its --operator-port, or the local end of an SSH tunnel) "
                       "(%(default)s)")
    where.add_argument("--coordinator", metavar="HOST:PORT",
                       help=f"the operator address, when not {OPERATOR_HOST}:OPERATOR_PORT "
                       "(the silos' address refuses runs)")
    _trust_args(r)
    r.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-config value (repeat), e.g. -c target-epsilon=4")
    r.add_argument("--out", type=Path, required=True,
                   help="output folder on the coordinator's machine")
    r.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in OUT/checkpoint")
    r.add_argument("--app", type=Path, help="the silotune app folder (default: this "
                   "checkout)")
    r.add_argument("--app-key", type=Path, metavar="APP_SIGNING_KEY",
                   help="the operator's app-signing.key: the app is signed with it, as the "
                   "agents require (required unless --unsigned)")
    r.add_argument("--unsigned", action="store_true",
                   help="submit the app unsigned (only agents started with "
                   "--allow-unsigned-apps run it)")


def show_ledger_key(argv: Sequence[str]) -> int | None:
    """`silotune agent --show-ledger-key --state-dir DIR`: print the ledger key and give
    exit status 0 (the agent's other flags, required to run it, are not needed); None
    for any other command line."""
    if not argv or argv[0] != "agent" or "--show-ledger-key" not in argv:
        return None
    only = argparse.ArgumentParser(prog="silotune agent --show-ledger-key")
    only.add_argument("--state-dir", type=Path, required=True)
    state_dir = only.parse_known_args(list(argv[1:]))[0].state_dir
    from silotune.deploy.agent import ledger_key

    print(ledger_key(state_dir))
    return 0


def run_deploy_job(args: argparse.Namespace) -> int:
    """Run the deployment job `args.job` under `PRIVATE_UMASK` (what a service and the
    Flower processes it starts create is its user's alone); a known failure prints its
    message and gives exit status 2."""
    umask = os.umask(PRIVATE_UMASK)
    try:
        return DEPLOY_JOBS[args.job](args)
    except (DeployError, CertsError, AppSignatureError, NodeConfigError, ConfigError,
            ProfileError, PermissionError) as err:
        print(f"silotune {args.job}: error: {err}", file=sys.stderr)
        return 2
    finally:
        os.umask(umask)


def _certs(args: argparse.Namespace) -> int:
    from silotune.deploy.certs import create_material

    if not args.host and not args.silo and not args.app_signing:
        raise CertsError("nothing to create: pass --host NAME_OR_IP (CA and coordinator "
                         "certificate), --silo ID (a silo's node key pair) and/or "
                         "--app-signing (the operator's app-signing key pair)")
    for line in create_material(args.out, args.host, args.silo, args.app_signing).lines():
        print(line)
    return 0


def _coordinator(args: argparse.Namespace) -> int:
    from silotune.deploy.coordinator import CoordinatorSettings, register_silo, start

    settings = CoordinatorSettings(state_dir=args.state_dir, certs_dir=args.certs,
                                   host=args.host, port=args.port, insecure=args.insecure,
                                   operator_port=args.operator_port,
                                   max_request_mib=args.max_request_mib)
    if args.action == "register-silo":
        return register_silo(settings, args.public_key, args.name, args.examples,
                             args.ledger_key)
    return start(settings)


def _agent(args: argparse.Namespace) -> int:
    from silotune.deploy.agent import AgentSettings, run

    node = NodeSettings(silo_id=args.silo_id, data_path=args.data, state_dir=args.state_dir,
                        epsilon=args.epsilon, delta=args.delta, max_steps=args.max_steps,
                        importance_queries=args.importance_queries,
                        public_size=args.public_size,
                        profile=declared_profile(args),
                        text_column=args.text_column, label_column=args.label_column,
                        privacy_unit_column=args.privacy_unit_column)
    settings = AgentSettings(
        connection=Connection(args.coordinator, args.ca, args.insecure), key=args.key,
        node=node, max_attempts=max(1, args.max_attempts), backoff_seconds=args.backoff,
        runtime_port=args.runtime_port, app_key=args.app_key,
        allow_unsigned_apps=args.allow_unsigned_apps)
    return run(settings, lambda line: print(line, flush=True))


def declared_profile(args: argparse.Namespace) -> SiloProfile | None:
    """The resource profile of `silotune agent`'s flags, None when none is given; a
    partial or out-of-range one raises `ProfileError` naming the flags."""
    flags = (*RESOURCE_KEYS, PROFILE_PRECISIONS, PROFILE_NAME)
    given = {key: getattr(args, key.replace("-", "_")) for key in flags}
    return SiloProfile.from_node_config({k: v for k, v in given.items() if v is not None})


def _run(args: argparse.Namespace) -> int:
    from silotune.deploy.app_signing import load_private_key
    from silotune.deploy.submit import build_config, submit

    if args.app_key is not None and args.unsigned:
        raise DeployError("--app-key and --unsigned exclude each other: pass one")
    if args.app_key is None and not args.unsigned:
        raise DeployError("--app-key is required: pass app-signing.key (from `silotune "
                          "certs --app-signing`), since agents run only apps signed with "
                          "it; or --unsigned, for agents started with --allow-unsigned-apps")
    signing_key = None if args.app_key is None else load_private_key(args.app_key)
    overrides: dict[str, Any] = {}
    for item in args.config:
        key, sep, value = item.partition("=")
        if not sep:
            raise DeployError(f"-c {item!r}: expected KEY=VALUE, e.g. -c num-server-rounds=3")
        overrides[key.strip()] = value.strip().strip('"')
    cfg = build_config(overrides, args.out, args.resume)
    if not cfg.private:
        print("[run] NON-PRIVATE run (target-epsilon = inf): no DP guarantee for any silo "
              "that follows the run's target", flush=True)
    address = args.coordinator or f"{OPERATOR_HOST}:{args.operator_port}"
    code = submit(cfg, Connection(address, args.ca, args.insecure), args.app, signing_key)
    print(f"[run] exit status {code}; results in {cfg.out_dir} on the coordinator",
          file=sys.stderr if code else sys.stdout)
    return code


DEPLOY_JOBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "certs": _certs, "coordinator": _coordinator, "agent": _agent, "run": _run}
