"""`silotune run`: submit a federation run to a deployed coordinator and stream it.

The run is the silotune Flower App (this project's ``pyproject.toml``) submitted with
``flwr run APP silotune --stream --run-config ...``; the full run configuration is sent
explicitly (not only overrides), so a run is reproducible from its command line and
`silotune run --resume` can check that it continues the same run. Results land on the
coordinator's machine in ``OUT/metrics.json``, ``OUT/report.html`` and
``OUT/checkpoint/``, as for `silotune simulate`.

Silos run only an app signed with the consortium's app-signing key (deploy/app_signing.py):
with ``--app-key``, `signed_app` submits a copy of the app that carries the signature, so
Flower need not carry it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
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
    """Submit `cfg` and stream its log until it ends; returns `flwr run`'s exit code.
    With `key`, the app is signed (`signed_app`); without, it goes as it is and only
    agents started with ``--allow-unsigned-apps`` run it."""
    with tempfile.TemporaryDirectory(prefix="silotune-flwr-") as tmp:
        home = write_flwr_home(Path(tmp) / "flwr", conn)
        source = app or app_dir()
        app_path = source if key is None else signed_app(source, key, Path(tmp) / "app")
        proc = run_flwr(["run", str(app_path), CONNECTION, "--stream", "--run-config",
                         run_config_arg(cfg)], home)
    return proc.returncode
