"""`silotune run`: submit a federation run to a deployed coordinator and stream it.

The run is the silotune Flower App (this project's ``pyproject.toml``) submitted with
``flwr run APP silotune --stream --run-config ...``; the full run configuration is sent
explicitly (not only overrides), so a run is reproducible from its command line and
`silotune run --resume` can check that it continues the same run. Results land on the
coordinator's machine in ``OUT/metrics.json``, ``OUT/report.html`` and
``OUT/checkpoint/``, as for `silotune simulate`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import silotune
from silotune.config import RunConfig
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


def submit(cfg: RunConfig, conn: Connection, app: Path | None = None) -> int:
    """Submit `cfg` and stream its log until it ends; returns `flwr run`'s exit code."""
    with tempfile.TemporaryDirectory(prefix="silotune-flwr-") as tmp:
        home = write_flwr_home(Path(tmp), conn)
        app_path = str(app or app_dir())
        proc = run_flwr(["run", app_path, CONNECTION, "--stream", "--run-config",
                         run_config_arg(cfg)], home)
    return proc.returncode
