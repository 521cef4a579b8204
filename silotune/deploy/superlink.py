"""silotune's SuperLink: Flower's own app on two listeners, so that only the operator
drives the coordinator (docs/flower.md §8).

Flower 1.42's ``flower-superlink`` serves one FastAPI app (Fleet, Control and runtime
APIs) on one address, and the Control API of the open distribution has no
authentication: whoever reaches that address with the CA certificate can list, register
and unregister nodes and start runs that execute on every silo. This launcher builds the
app exactly as ``flower-superlink`` does (Flower's own argument parser, ``create_app``
and ``SuperLinkLifespan``; flwr is pinned, docs/flower.md) and serves it on two uvicorn
servers in one process and one event loop, with ONE lifespan (one state database, one
SuperExec):

- the operator listener, Flower's ``--host``/``--port``, which must be a loopback
  address: every API (Control for ``flwr run`` and ``flwr supernode ...``, the runtime
  API of the SuperExec and its ServerApps, Fleet). Its credential is a shell on the
  coordinator's machine, or an SSH tunnel to the port;
- the silos' listener, ``--fleet-host``/``--fleet-port`` (the published address): the
  same app behind `FleetOnly`, which answers 404 for every path outside ``/v1/fleet/``
  (all that ``flower-supernode`` calls) and 413 for a request body over
  ``--max-request-mib``, before that body is read.

Run as ``python -m silotune.deploy.superlink`` with ``flower-superlink``'s flags plus
``--fleet-host``, ``--fleet-port`` and ``--max-request-mib``; ``silotune coordinator``
(`silotune.deploy.coordinator`) does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import posixpath
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from logging import INFO
from typing import TYPE_CHECKING, Any, Literal

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from flwr.superlink.config_loader import SuperLinkLifespanConfig

FLEET_PREFIX = "/v1/fleet/"
MIB = 1 << 20
# Flower sends every array in 5 MiB chunks, one object per request, and a message's
# content separately from its small header (flwr/supernode/fleet_http_connection.py), so
# an honest Fleet request stays a few MiB; 64 MiB leaves a wide margin.
DEFAULT_MAX_REQUEST_MIB = 64
NOT_FLEET = ("this address serves only the silos' Fleet API (/v1/fleet/); operators "
             "drive the coordinator through its operator port on its own machine "
             "(`silotune run` / `silotune coordinator register-silo` there, or an SSH "
             "tunnel to it)")


class FleetOnly:
    """ASGI wrapper of the silos' listener: Fleet paths only, request bodies capped.

    A request outside ``/v1/fleet/`` gets 404 without reaching `app`. A body declared
    (``Content-Length``) over `max_body_bytes` gets 413 before any of it is read; a body
    without a declared length is counted while it is received, cut with 413 at the cap,
    and handed to `app` only once complete.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the Fleet API has none
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # the lifespan belongs to the operator listener
            return
        if not is_fleet_path(scope["path"]):
            await _refuse(send, 404, NOT_FLEET)
            return
        declared = _declared_length(scope)
        too_big = (f"request body over the coordinator's limit of {self.max_body_bytes} "
                   "bytes (silotune coordinator --max-request-mib)")
        if declared == -1:
            await _refuse(send, 400, "invalid Content-Length header")
            return
        if declared is not None and declared > self.max_body_bytes:
            await _refuse(send, 413, too_big)
            return
        if declared is None:  # chunked: count while receiving, cut at the cap
            body = await self._read_capped(receive)
            if body is None:
                await _refuse(send, 413, too_big)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_capped(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it passes the cap or the client disconnects."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def is_fleet_path(path: str) -> bool:
    """Whether `path` is under ``/v1/fleet/`` and in normal form (no ``.``, ``..`` or
    empty segment that a router might read differently)."""
    return path.startswith(FLEET_PREFIX) and posixpath.normpath(path) == path


def _declared_length(scope: Scope) -> int | None:
    """The Content-Length of the request: None when absent, -1 when not a number."""
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else -1
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` as one message, then defers to `receive`."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


async def _refuse(send: Send, status: int, detail: str) -> None:
    """Answer with `status` and a JSON ``detail`` (what the ``flwr`` CLI prints)."""
    body = json.dumps({"detail": f"silotune coordinator: {detail}"}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class Listener(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve_both` and may share the lifespan
    state of the listener that ran the app's lifespan."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        super().__init__(config)
        self.sock = sock
        self.shared_state: dict[str, Any] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.shared_state is not None:
            self.lifespan.state = self.shared_state
        await super().startup(sockets)


async def serve_both(operator: Listener, silos: Listener) -> bool:
    """Serve both listeners until a signal (or either stops); the operator listener runs
    the app's lifespan and the silos' listener starts only after it. Returns whether
    both started (a failure is logged by uvicorn)."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in (operator, silos):
            server.force_exit = server.should_exit  # a second signal: stop at once
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    first = asyncio.create_task(operator.serve(sockets=[operator.sock]))
    while not operator.started and not first.done():
        await asyncio.sleep(0.05)
    if first.done():  # the lifespan failed
        await first
        return False
    silos.shared_state = operator.lifespan.state
    second = asyncio.create_task(silos.serve(sockets=[silos.sock]))
    await asyncio.wait({first, second}, return_when=asyncio.FIRST_COMPLETED)
    silos.should_exit = True  # the silos go first, then the lifespan's owner
    await second
    operator.should_exit = True
    await first
    return silos.started


def parser() -> argparse.ArgumentParser:
    """silotune's own flags; every other flag goes to Flower's ``flower-superlink``
    parser (its ``--host``/``--port`` are the operator listener)."""
    p = argparse.ArgumentParser(
        prog="python -m silotune.deploy.superlink", allow_abbrev=False,
        description="Flower's SuperLink on a loopback operator listener (Flower's --host/"
        "--port: all APIs) and a silos' listener (Fleet API only, bodies capped). Every "
        "other flag is flower-superlink's (see `flower-superlink --help`).")
    p.add_argument("--fleet-host", default="127.0.0.1",
                   help="address of the silos' listener; 0.0.0.0 for silos on other "
                   "machines (%(default)s)")
    p.add_argument("--fleet-port", type=int, required=True,
                   help="port of the silos' listener")
    p.add_argument("--max-request-mib", type=int, default=DEFAULT_MAX_REQUEST_MIB,
                   help="largest request body the silos' listener accepts, in MiB "
                   "(%(default)s)")
    return p


def bind(host: str, port: int, flag: str) -> socket.socket:
    """A listening socket on `host`:`port`; `SystemExit` naming `flag` when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise SystemExit(f"silotune superlink: error: cannot listen on {host}:{port} "
                         f"({flag}): {err.strerror}; free the port or choose another "
                         "one") from None


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def uvicorn_config(app: ASGIApp, config: SuperLinkLifespanConfig,
                   lifespan: Literal["on", "off"]) -> uvicorn.Config:
    """The uvicorn settings ``flower-superlink`` uses (its TLS files and log config)."""
    from flwr.supercore.http_logging import get_uvicorn_log_config  # see `main`
    from flwr.supercore.logger import console_handler

    return uvicorn.Config(app, lifespan=lifespan, access_log=True,
                          log_config=get_uvicorn_log_config(console_handler.level),
                          ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile,
                          workers=1)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags, bind both listeners, build Flower's app and serve it."""
    # Flower's server side is imported here, not at the top: `silotune --help` reads
    # this module's defaults and should not pay for it.
    from flwr.supercore import log
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    ours, flower_argv = parser().parse_known_args(argv)
    sys.argv = ["flower-superlink", *flower_argv]  # Flower's parser reads sys.argv
    config = _parse_superlink_lifespan_config()
    if not is_loopback(config.host):
        raise SystemExit(f"silotune superlink: error: --host {config.host} is the "
                         "operator listener, which serves the unauthenticated Control "
                         "API; it must be a loopback address (127.0.0.1 or ::1)")
    if ours.max_request_mib < 1:
        raise SystemExit("silotune superlink: error: --max-request-mib must be >= 1")
    operator_sock = bind(config.host, config.port, "--port")
    silos_sock = bind(ours.fleet_host, ours.fleet_port, "--fleet-port")
    app = create_app(config, SuperLinkLifespan)
    scheme = "http" if config.insecure else "https"
    log(INFO, "Starting Flower SuperLink (silotune): operator API (Control, runtime, "
        "Fleet) on %s://%s:%s; silos' API (/v1/fleet/ only, request bodies <= %s MiB) on "
        "%s://%s:%s", scheme, config.host, config.port, ours.max_request_mib, scheme,
        ours.fleet_host, ours.fleet_port)
    operator = Listener(uvicorn_config(app, config, "on"), operator_sock)
    silos = Listener(uvicorn_config(FleetOnly(app, ours.max_request_mib * MIB), config,
                                    "off"), silos_sock)
    return 0 if asyncio.run(serve_both(operator, silos)) else 1


if __name__ == "__main__":
    sys.exit(main())
