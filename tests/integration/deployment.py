"""Helpers to run real `silotune coordinator` / `agent` / `run` processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}


def silotune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "silotune.cli", *args], env=env(),
                          capture_output=True, text=True, timeout=timeout)


def flwr(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`flwr ARGS` with the Flower config in `home` (its FLWR_HOME)."""
    return subprocess.run([str(Path(sys.executable).parent / "flwr"), *args],
                          env={**env(), "FLWR_HOME": str(home)}, capture_output=True,
                          text=True, timeout=timeout)


def flwr_json(home: Path, *args: str) -> dict:
    """The JSON that `flwr ARGS --format json` prints; fails on a non-zero exit."""
    done = flwr(home, *args, "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout[done.stdout.index("{"):])


def declare_post(address: str, ca: Path, path: str, length: int) -> int:
    """Send the headers of a TLS POST to `address` that declares a `length`-byte body,
    and none of the body; return the HTTP status of the answer."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, int(port)), timeout=60) as raw, \
            context.wrap_socket(raw, server_hostname=host) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {address}\r\n"
                     "Content-Type: application/protobuf\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        status_line = sock.makefile("rb").readline().decode()
    return int(status_line.split()[1])


class Process:
    """A background `silotune ...` process in its own session, with its log in a file."""

    def __init__(self, name: str, args: list[str], log_dir: Path) -> None:
        self.name, self.args = name, args
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[str] = self.log_path.open("a")
        self.proc = subprocess.Popen([sys.executable, "-m", "silotune.cli", *args],
                                     env={**env(), "FLWR_HOME": str(log_dir / f"{name}-flwr")},
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, text: str, timeout: float = 300) -> None:
        wait_until(lambda: text in self.log() or self.proc.poll() is not None, timeout,
                   f"{self.name} to log {text!r}")
        if text not in self.log():
            raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before "
                                 f"logging {text!r}:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal the process (it forwards to Flower's processes) and wait for it."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def wait_until(ok: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def checkpoint_round(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0
