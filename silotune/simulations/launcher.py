"""`silotune simulate`: many silos on one machine with the Flower Simulation Engine (Ray).

Everything that can fail on bad input (strategy name, model, dataset, split) is checked
here, before Ray starts, so the user gets one clear message instead of a worker trace.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from silotune import strategies
from silotune.client.app import build_client_app
from silotune.config import RunConfig
from silotune.files import atomic_write_json
from silotune.ml.assets import resolve_model
from silotune.progress import Emit
from silotune.simulations.checks import check_names
from silotune.simulations.cluster import backend_config
from silotune.simulations.federation import federated_task, silo_name
from silotune.simulations.plan import check_profiles
from silotune.simulations.silos import simulated_silos

SHOW_SIZES = 8  # silo sizes printed at start-up (the first few)


def simulate(cfg: RunConfig, progress: Emit = print,
             ray_address: str | None = None) -> dict[str, Any]:
    """Run the federation `cfg` in the Flower Simulation Engine; return metrics.json.

    `ray_address` (``HOST:PORT``) runs the silos on an existing Ray cluster instead of a
    private Ray on this machine (see `silotune.simulations.cluster`).
    """
    check_names(cfg)
    ranks = {silo_name(i): cfg.rank_of(i) for i in range(min(cfg.num_silos,
                                                             len(cfg.lora_ranks)))}
    strategies.create(cfg.strategy).setup(ranks, {}, cfg.seed)  # e.g. equal-rank rules
    backend = backend_config(ray_address)
    resolve_model(cfg.model, progress=progress)  # convert once, before workers race for it
    if cfg.mode == "crosslm":
        from silotune.ml.assets import general_text, resolve_slm

        resolve_slm(cfg.slm)  # a missing SLM or text package fails here, not in a worker
        general_text(count=1)
    task = federated_task(cfg)
    check_profiles(cfg)  # a silo that fits no configuration fails here, not in a worker
    shown = min(task.num_silos, SHOW_SIZES)
    sizes = ", ".join(str(len(task.silo_frame(i))) for i in range(shown))
    more = f", ... ({task.num_silos} silos)" if task.num_silos > shown else ""
    progress(f"[data] {cfg.dataset}: {len(task.labels)} labels, held-out {len(task.test)}, "
             f"{cfg.partition} partition, silo sizes {sizes}{more}")
    if not cfg.private:
        progress("[privacy] NON-PRIVATE run (epsilon = inf): no DP guarantee for any silo")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", cfg.to_json_dict())

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Ray's memory monitor kills workers when the *machine* passes 95% memory use, even
    # when other programs fill it; on a shared machine that drops silos at random. The
    # kernel's OOM killer still guards real exhaustion. Set the variable to re-enable.
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    # The silo workers' Flower logger: only errors. Its warnings there are Flower's own
    # shutdown notices ("Manually terminating ClientAppActor", one per worker per run);
    # silotune's silos report through their replies and the coordinator's log.
    os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
    if not sys.stdout.isatty():  # a log file: no colour codes around Ray's worker prefixes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    from flwr.simulation import run_simulation  # heavy import (Ray), only when simulating

    from silotune.server.app import build_server_app

    # Flower warns that run_simulation is deprecated in favour of `flwr run`; silotune
    # runs the same engine in-process on purpose (no background SuperLink to clean up).
    logging.getLogger("flwr").setLevel(logging.ERROR)
    if not sys.stdout.isatty():  # Flower colours its level names unless told not to
        from flwr.common.logger import update_console_handler

        update_console_handler(colored=False)
    if ray_address:
        progress(f"[ray] joining the Ray cluster at {ray_address}")
    run_simulation(
        server_app=build_server_app(cfg, progress),
        client_app=build_client_app(simulated_silos(cfg)),
        num_supernodes=cfg.num_silos,
        backend_config=backend,
    )
    metrics_path = out / "metrics.json"
    if not metrics_path.exists():
        raise RuntimeError(f"the simulation ended without writing {metrics_path}; "
                           "see the log above for the failing round")
    result: dict[str, Any] = json.loads(metrics_path.read_text())
    return result
