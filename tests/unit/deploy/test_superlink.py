"""The silos' listener of silotune's SuperLink (`FleetOnly`: Fleet paths only, bodies
capped) driven as a real ASGI app, and the coordinator settings that place the operator
on its loopback port (docs/flower.md §8)."""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from silotune.deploy import certs, superlink
from silotune.deploy.connection import DeployError
from silotune.deploy.coordinator import CoordinatorSettings, superlink_command
from silotune.deploy.superlink import FleetOnly, is_fleet_path

CAP = 1000


class RecordingApp:
    """An ASGI app that reads the whole body, records it and answers 200."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(path: str, chunks: Sequence[bytes], *, length: int | None = None,
         ) -> tuple[int, dict[str, Any] | None, RecordingApp, int]:
    """POST `chunks` to `path` through `FleetOnly`; returns the status, the JSON body of
    a refusal, the app and how many times the server's `receive` was called."""
    app = RecordingApp()
    headers = [(b"content-type", b"application/protobuf")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    incoming = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(FleetOnly(app, CAP)(scope, receive, send))
    status = sent[0]["status"]
    detail = json.loads(sent[1]["body"]) if status != 200 else None
    return status, detail, app, received


def test_only_fleet_paths_reach_the_app():
    for path in ("/v1/control/list-nodes", "/v1/control/start-run", "/v1/runtime/get-nodes",
                 "/health", "/docs", "/v1/fleet/../control/list-nodes", "/v1/fleetx"):
        status, detail, app, _ = call(path, [b"x"], length=1)
        assert status == 404 and app.bodies == [], path
        assert detail is not None and "operator port" in detail["detail"]
    status, _, app, _ = call("/v1/fleet/push-object", [b"abc"], length=3)
    assert status == 200 and app.bodies == [b"abc"]
    assert not is_fleet_path("/v1/fleet/./push-object") and not is_fleet_path("/v1/fleet//x")
    assert is_fleet_path("/v1/fleet/pull-messages")


def test_declared_oversize_is_refused_before_the_body_is_read():
    status, detail, app, received = call("/v1/fleet/push-object", [b"x" * (CAP + 1)],
                                         length=CAP + 1)
    assert status == 413 and app.bodies == [] and received == 0
    assert detail is not None and "--max-request-mib" in detail["detail"]
    status, _, app, _ = call("/v1/fleet/push-object", [b"x" * CAP], length=CAP)
    assert status == 200 and app.bodies == [b"x" * CAP]  # the cap itself passes


def test_undeclared_body_is_counted_and_cut_at_the_cap():
    chunks = [b"y" * 400] * 10  # 4000 bytes, no Content-Length (chunked)
    status, detail, app, received = call("/v1/fleet/push-messages", chunks)
    assert status == 413 and app.bodies == []
    assert received == 3  # stopped at the chunk that passed 1000 bytes
    assert detail is not None and str(CAP) in detail["detail"]
    status, _, app, _ = call("/v1/fleet/push-messages", [b"a" * 500, b"b" * 500])
    assert status == 200 and app.bodies == [b"a" * 500 + b"b" * 500]


def test_bad_content_length_and_websocket_are_refused():
    app = RecordingApp()
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    bad = {"type": "http", "path": "/v1/fleet/push-object",
           "headers": [(b"content-length", b"-5")]}
    asyncio.run(FleetOnly(app, CAP)(bad, receive, send))
    assert sent[0]["status"] == 400 and app.bodies == []
    asyncio.run(FleetOnly(app, CAP)({"type": "websocket", "path": "/v1/fleet/x",
                                     "headers": []}, receive, send))
    assert sent[-1]["type"] == "websocket.close" and app.bodies == []


def test_operator_listener_must_be_loopback(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main hands Flower its own argv
    with pytest.raises(SystemExit, match="must be a loopback address"):
        superlink.main(["--insecure", "--host", "0.0.0.0", "--fleet-port", "9093"])
    assert superlink.is_loopback("127.0.0.1") and superlink.is_loopback("::1")
    assert not superlink.is_loopback("10.0.0.1") and not superlink.is_loopback("localhost")


def test_coordinator_puts_the_operator_on_its_loopback_port(tmp_path: Path):
    certs.create_material(tmp_path / "c", ["coord.example.org", "127.0.0.1"], [])
    settings = CoordinatorSettings(tmp_path / "st", tmp_path / "c", host="0.0.0.0",
                                   port=9093, operator_port=9095, max_request_mib=8)
    assert settings.connection.address == "127.0.0.1:9095"
    cmd = superlink_command(settings)
    flags = {flag: value for flag, value in itertools.pairwise(cmd)
             if flag.startswith("--")}
    assert cmd[1:3] == ["-m", "silotune.deploy.superlink"]
    assert (flags["--host"], flags["--port"]) == ("127.0.0.1", "9095")
    assert (flags["--fleet-host"], flags["--fleet-port"]) == ("0.0.0.0", "9093")
    assert flags["--max-request-mib"] == "8"
    with pytest.raises(DeployError, match="must differ"):
        CoordinatorSettings(tmp_path / "st", operator_port=9093, port=9093)
    with pytest.raises(DeployError, match="--max-request-mib 0"):
        CoordinatorSettings(tmp_path / "st", max_request_mib=0)

    certs.create_material(tmp_path / "public-only", ["coord.example.org"], [])
    with pytest.raises(DeployError, match=r"does not name 127\.0\.0\.1.*--host 127\.0\.0\.1"):
        superlink_command(CoordinatorSettings(tmp_path / "st", tmp_path / "public-only"))
