"""`silotune simulate`: many silos on one machine with the Flower Simulation Engine (Ray).

Everything that can fail on bad input (strategy name, model, dataset, split) is checked
here, before Ray starts, so the user gets one clear message instead of a worker trace.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from silotune import strategies
from silotune.assets import resolve_model
from silotune.client.app import build_client_app
from silotune.config import RunConfig
from silotune.server.loop import Progress
from silotune.simulations.federation import federated_task, silo_name
from silotune.simulations.plan import check_profiles


def simulate(cfg: RunConfig, progress: Progress = print) -> dict[str, Any]:
    """Run the federation `cfg` in the Flower Simulation Engine; return metrics.json."""
    ranks = {silo_name(i): cfg.rank_of(i) for i in range(cfg.num_silos)}
    strategies.create(cfg.strategy).setup(ranks, {}, cfg.seed)  # e.g. equal-rank rules
    resolve_model(cfg.model, progress=progress)  # convert once, before workers race for it
    task = federated_task(cfg)
    check_profiles(cfg)  # a silo that fits no configuration fails here, not in a worker
    sizes = ", ".join(str(len(p)) for p in task.silos)
    progress(f"[data] {cfg.dataset}: {len(task.labels)} labels, held-out {len(task.test)}, "
             f"silo sizes {sizes}")
    if not cfg.private:
        progress("[privacy] NON-PRIVATE run (epsilon = inf): no DP guarantee for any silo")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_json_dict(), indent=2) + "\n")

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation  # heavy import (Ray), only when simulating

    from silotune.server.app import build_server_app

    # Flower warns that run_simulation is deprecated in favour of `flwr run`; silotune
    # runs the same engine in-process on purpose (no background SuperLink to clean up).
    logging.getLogger("flwr").setLevel(logging.ERROR)
    cpus = max(1, os.cpu_count() or 1)
    run_simulation(
        server_app=build_server_app(cfg, progress),
        client_app=build_client_app(cfg),
        num_supernodes=cfg.num_silos,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "WARNING",
                          "log_to_driver": True, "include_dashboard": False},
        },
    )
    metrics_path = out / "metrics.json"
    if not metrics_path.exists():
        raise RuntimeError(f"the simulation ended without writing {metrics_path}; "
                           "see the log above for the failing round")
    result: dict[str, Any] = json.loads(metrics_path.read_text())
    return result
