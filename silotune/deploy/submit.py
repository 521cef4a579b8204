"""`silotune run`: submit a federation run to a deployed coordinator and stream it.

The run is the silotune Flower App (this project's ``pyproject.toml``) submitted with
``flwr run APP silotune --run-config ...``; the full run configuration is sent
explicitly (not only overrides), so a run is reproducible from its command line and
`silotune run --resume` can check that it continues the same run. Results land on the
coordinator's machine in ``OUT/metrics.json``, ``OUT/report.html`` and
``OUT/checkpoint/``, as for `silotune simulate`.

Silos run only an app signed with the consortium's app-signing key (deploy/app_signing.py):
with ``--app-key``, `signed_app` submits a copy of the app that carries the signature, so
Flower need not carry it.

How the run ended decides the exit status. ``flwr run --stream`` exits 0 even when the
ServerApp raised (docs/flower.md §3), so `follow_run` starts the run with ``--format
json`` (its run id), streams its log with ``flwr log``, then asks the coordinator for
the run's final status (``flwr ls --run-id ID --format json``: ``finished:completed``,
``finished:failed`` with the exception in its details, ``finished:stopped``) and
succeeds only for a completed run.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import silotune
from silotune.config import RunConfig
from silotune.deploy.app_signing import (
    SIGNATURE_FILE,
    AppSignatureError,
    fab_files,
    sign_files,
    verify_fab,
)
from silotune.deploy.connection import (
    CONNECTION,
    Connection,
    DeployError,
    run_flwr,
    write_flwr_home,
)


def app_dir() -> Path:
    """The folder of silotune's Flower App (the one holding its ``pyproject.toml``)."""
    root = Path(silotune.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise DeployError(f"no pyproject.toml next to the silotune package ({root}); "
                          "run `silotune run` from a source checkout or pass --app DIR")
    return root


def run_config_arg(cfg: RunConfig) -> str:
    """``--run-config`` text for `cfg`: every key, TOML values (``inf`` for infinity)."""
    parts = []
    for key, value in cfg.to_flower().items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif value == "inf" and isinstance(RunConfig().to_flower()[key], float):
            text = "inf"  # a float field set to infinity (to_flower writes it as "inf")
        else:
            text = json.dumps(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def build_config(overrides: Mapping[str, Any], out: Path, resume: bool) -> RunConfig:
    """The run's configuration: silotune's defaults, then `overrides` (kebab-case keys as
    in ``[tool.flwr.app.config]``), with an absolute `out` on the coordinator."""
    values = {**RunConfig().to_flower(), **overrides}
    values.update({"out-dir": str(out if out.is_absolute() else out.resolve()),
                   "resume": resume})
    return RunConfig.from_mapping(values)


def signed_app(app: Path, key: Ed25519PrivateKey, dest: Path) -> Path:
    """A copy of `app` in `dest` that carries its signature: the files `flwr build` and
    `flwr run` consider (flwr/cli/utils.py ``collect_files``, ``filter_paths_for_publish``:
    ``.gitignore`` and Flower's publish patterns), plus `SIGNATURE_FILE` over exactly the
    FAB Flower builds from them (``build_fab_from_disk``, as `flwr run` does). The FAB of
    the copy is built again and verified, so a signature that a ``.gitignore`` or
    ``[tool.flwr.app]`` include/exclude rule would drop fails here, not on the silos."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.utils import collect_files, filter_paths_for_publish

    copy = dest / app.resolve().name
    try:
        for rel, source in filter_paths_for_publish(collect_files(app.resolve())).items():
            if rel != SIGNATURE_FILE:  # an old signature is replaced
                target = copy / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
        (copy / SIGNATURE_FILE).write_bytes(
            sign_files(fab_files(build_fab_from_disk(copy)), key))
        verify_fab(build_fab_from_disk(copy), key.public_key())
    except AppSignatureError as err:
        raise DeployError(f"the FAB Flower builds from {app} does not carry a valid "
                          f"{SIGNATURE_FILE} ({err}); make sure its .gitignore and "
                          "[tool.flwr.app] include/exclude keep that file") from err
    except ValueError as err:  # Flower's own reasons: pyproject.toml, paths, size
        raise DeployError(f"cannot build a Flower App from {app}: {err}") from err
    return copy


def submit(cfg: RunConfig, conn: Connection, app: Path | None = None,
           key: Ed25519PrivateKey | None = None) -> int:
    """Submit `cfg`, stream its log until it ends; the exit status of `follow_run`.
    With `key`, the app is signed (`signed_app`); without, it goes as it is and only
    agents started with ``--allow-unsigned-apps`` run it."""
    with tempfile.TemporaryDirectory(prefix="silotune-flwr-") as tmp:
        home = write_flwr_home(Path(tmp) / "flwr", conn)
        source = app or app_dir()
        app_path = source if key is None else signed_app(source, key, Path(tmp) / "app")
        return follow_run(["run", str(app_path), CONNECTION, "--run-config",
                           run_config_arg(cfg)], home)


COMPLETED = "finished:completed"  # Flower's status text of a run whose ServerApp returned


@dataclass(frozen=True)
class RunOutcome:
    """How the coordinator says a run ended (``flwr ls``'s status and its details)."""

    run_id: int
    status: str  # e.g. "finished:completed", "finished:failed", "running"
    details: str  # for a failed run: "ServerApp failed with exception: ..."

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    def line(self) -> str:
        text = f"[run] run {self.run_id} {self.status}"
        if self.details and self.details != "N/A":
            text += f": {self.details}"
        if not self.status.startswith("finished"):
            text += ("; the log stream ended before the run did (lost connection to the "
                     "coordinator?): the run may go on there")
        return text


def follow_run(run_args: Sequence[str], home: Path) -> int:
    """Start ``flwr RUN_ARGS`` (a ``flwr run`` command line), stream the run's log, and
    report how it ended: 0 for a completed run, 1 for any other end, 130 when the
    operator interrupts the stream (the run keeps running on the coordinator).

    Raises
    ------
    DeployError
        The coordinator did not start the run, or cannot say how it ended.
    """
    started = run_flwr([*run_args, "--format", "json"], home, capture=True)
    run_id = started_run_id(started.stdout, started.stderr)
    print(f"[run] run {run_id} started; streaming its log", flush=True)
    try:
        run_flwr(["log", str(run_id), CONNECTION, "--stream"], home)
    except KeyboardInterrupt:
        print(f"[run] stopped following run {run_id}; it keeps running on the coordinator",
              file=sys.stderr)
        return 130
    listed = run_flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                      home, capture=True)
    outcome = run_outcome(run_id, listed.stdout, listed.stderr)
    print(outcome.line(), file=sys.stdout if outcome.completed else sys.stderr, flush=True)
    return 0 if outcome.completed else 1


def started_run_id(stdout: str, stderr: str = "") -> int:
    """The run id in ``flwr run --format json``'s output; a refusal raises with Flower's
    reason."""
    answer = _flwr_json(stdout, stderr, "flwr run")
    if not answer.get("success") or answer.get("run-id") is None:
        raise DeployError("the coordinator did not start the run: "
                          f"{_reason(answer)}")
    return int(answer["run-id"])


def run_outcome(run_id: int, stdout: str, stderr: str = "") -> RunOutcome:
    """Run `run_id`'s status in ``flwr ls --run-id ID --format json``'s output."""
    answer = _flwr_json(stdout, stderr, "flwr ls")
    runs = [r for r in answer.get("runs", []) if str(r.get("run-id")) == str(run_id)]
    if not answer.get("success") or not runs:
        raise DeployError(f"cannot ask the coordinator how run {run_id} ended: "
                          f"{_reason(answer)}; its results, if any, are in the run's "
                          "out-dir on the coordinator")
    return RunOutcome(run_id, str(runs[0].get("status", "unknown")),
                      str(runs[0].get("status-details", "")))


def _flwr_json(stdout: str, stderr: str, command: str) -> dict[str, Any]:
    try:
        answer = json.loads(stdout)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        output = (stdout.strip() + "\n" + stderr.strip()).strip()[-2000:]
        raise DeployError(f"`{command}` gave no JSON answer; it said:\n{output}")
    return answer


def _reason(answer: dict[str, Any]) -> str:
    message = str(answer.get("error-message") or "no reason given").strip()
    return " ".join(message.split())
