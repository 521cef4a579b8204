"""Arguments of the deployment jobs: certs, coordinator, agent, run (thin wrappers)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from silotune.client.node import NodeConfigError, NodeSettings
from silotune.config import ConfigError
from silotune.deploy.certs import CertsError
from silotune.deploy.connection import Connection, DeployError
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


def _connection_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--coordinator", default="127.0.0.1:9093", metavar="HOST:PORT",
                   help="the coordinator's address as the silos dial it (%(default)s)")
    p.add_argument("--ca", type=Path, metavar="CA_CRT",
                   help="the consortium CA certificate (ca.crt from `silotune certs`)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS (only for a coordinator started with --insecure)")


def add_deploy_parsers(sub: Any) -> None:
    """Add the certs, coordinator, agent and run sub-commands to `sub`."""
    c = sub.add_parser(
        "certs", help="create the CA, the coordinator's TLS certificate and silo key pairs",
        description="Create TLS and node-authentication material with safe permissions "
        "(private keys 0600). Existing files are kept, never overwritten.")
    c.add_argument("--out", type=Path, required=True, help="folder for the material")
    c.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                   help="a host name or IP the silos dial to reach the coordinator "
                   "(repeat for several); creates the CA and coordinator certificate")
    c.add_argument("--silo", action="append", default=[], metavar="ID",
                   help="create silos/ID/node.key and node.pub (repeat for several)")

    co = sub.add_parser(
        "coordinator", help="start the coordinator service (Flower SuperLink with TLS, node "
        "authentication and a persistent state database)",
        description="Start the coordinator (Flower SuperLink) in the foreground. Refuses "
        "to start without TLS certificates unless --insecure is given.")
    co.add_argument("--state-dir", type=Path, default=Path("coordinator-state"),
                    help="state database and Flower config (%(default)s)")
    co.add_argument("--certs", type=Path, help="folder made by `silotune certs --host ...`")
    co.add_argument("--host", default="127.0.0.1",
                    help="address to listen on; 0.0.0.0 for silos on other machines "
                    "(%(default)s)")
    co.add_argument("--port", type=int, default=9093, help="port to listen on (%(default)s)")
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
    _connection_args(a)
    a.add_argument("--key", type=Path, help="the silo's node private key (node.key)")
    a.add_argument("--silo-id", required=True, help="the silo's name in metrics and ledgers")
    a.add_argument("--data", type=Path, required=True,
                   help="the silo's private training data (.jsonl/.json/.csv/.parquet)")
    a.add_argument("--state-dir", type=Path, required=True,
                   help="the silo's ledger, signing key and last reply")
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
        "log. OUT is a folder on the coordinator's machine.")
    _connection_args(r)
    r.add_argument("-c", "--config", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-config value (repeat), e.g. -c target-epsilon=4")
    r.add_argument("--out", type=Path, required=True,
                   help="output folder on the coordinator's machine")
    r.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint is in OUT/checkpoint")
    r.add_argument("--app", type=Path, help="the silotune app folder (default: this "
                   "checkout)")


def run_deploy_job(args: argparse.Namespace) -> int:
    """Run the deployment job `args.job` under `PRIVATE_UMASK` (what a service and the
    Flower processes it starts create is its user's alone); a known failure prints its
    message and gives exit status 2."""
    umask = os.umask(PRIVATE_UMASK)
    try:
        return DEPLOY_JOBS[args.job](args)
    except (DeployError, CertsError, NodeConfigError, ConfigError, ProfileError,
            PermissionError) as err:
        print(f"silotune {args.job}: error: {err}", file=sys.stderr)
        return 2
    finally:
        os.umask(umask)


def _certs(args: argparse.Namespace) -> int:
    from silotune.deploy.certs import create_material

    if not args.host and not args.silo:
        raise CertsError("nothing to create: pass --host NAME_OR_IP (CA and coordinator "
                         "certificate) and/or --silo ID (a silo's node key pair)")
    for line in create_material(args.out, args.host, args.silo).lines():
        print(line)
    return 0


def _coordinator(args: argparse.Namespace) -> int:
    from silotune.deploy.coordinator import CoordinatorSettings, register_silo, start

    settings = CoordinatorSettings(state_dir=args.state_dir, certs_dir=args.certs,
                                   host=args.host, port=args.port, insecure=args.insecure)
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
        runtime_port=args.runtime_port)
    return run(settings, lambda line: print(line, flush=True))


def declared_profile(args: argparse.Namespace) -> SiloProfile | None:
    """The resource profile of `silotune agent`'s flags, None when none is given; a
    partial or out-of-range one raises `ProfileError` naming the flags."""
    flags = (*RESOURCE_KEYS, PROFILE_PRECISIONS, PROFILE_NAME)
    given = {key: getattr(args, key.replace("-", "_")) for key in flags}
    return SiloProfile.from_node_config({k: v for k, v in given.items() if v is not None})


def _run(args: argparse.Namespace) -> int:
    from silotune.deploy.submit import build_config, submit

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
    code = submit(cfg, Connection(args.coordinator, args.ca, args.insecure), args.app)
    print(f"[run] flwr run exited with {code}; results in {cfg.out_dir} on the coordinator",
          file=sys.stderr if code else sys.stdout)
    return code


DEPLOY_JOBS: dict[str, Callable[[argparse.Namespace], int]] = {
    "certs": _certs, "coordinator": _coordinator, "agent": _agent, "run": _run}
