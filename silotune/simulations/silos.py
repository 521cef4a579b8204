"""Simulated silos: what each simulated silo's operator would have set up.

The launcher hands the ClientApp a `SiloSource` that gives simulated silo ``i`` (Flower's
``partition-id``) its partition of the run's dataset, its own privacy policy (the run's
epsilon and delta as its lifetime limits; one importance query when FedPipe profiles
are on; diagnostics such as peak memory, which only a simulation may send, since one
operator holds all of its data), its state folder and ledger under the run's output
folder, its resource profile from the simulation's mix, and, for research comparisons
only, reproducible DP noise and batches (``dp-noise-seed``). A deployed silo never goes
through this module.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context

from silotune.client.local import Silo, SiloSource
from silotune.client.policy import SiloPolicy
from silotune.config import RunConfig
from silotune.planning.profiles import RESOURCE_KEYS, ProfileError, SiloProfile, mix_profiles
from silotune.simulations.cluster import worker_node
from silotune.simulations.federation import federated_task, silo_name

# In a silo worker (this module is imported where the ClientApp runs), Flower's records
# go to its own console handler only (its level is FLWR_LOG_LEVEL, set by the launcher):
# Opacus calls logging.basicConfig on import, and propagating to that root handler would
# print each of Flower's records a second time, e.g. its shutdown notices.
logging.getLogger("flwr").propagate = False


def simulated_silos(cfg: RunConfig) -> SiloSource:
    """The source of the simulated silos of run `cfg`."""
    def source(context: Context) -> Silo:
        index = int(context.node_config.get("partition-id", 0))
        num = int(context.node_config.get("num-partitions", cfg.num_silos))
        run = cfg if num == cfg.num_silos else dataclasses.replace(cfg, num_silos=num)
        task = federated_task(run)
        silo_id = silo_name(index)
        out = Path(run.out_dir)
        return Silo(silo_id=silo_id, index=index, state_dir=out / "silos" / silo_id,
                    ledger_path=out / "ledgers" / f"{silo_id}.jsonl",
                    load_data=lambda: task.silo_frame(index),
                    policy=SiloPolicy(epsilon=run.target_epsilon, delta=run.target_delta,
                                      importance_queries=1 if run.profiles else 0,
                                      diagnostics=True),
                    profile=simulated_profile(run, index, context.node_config),
                    exact_size_public=True,
                    noise_seed_base=run.dp_noise_seed if run.dp_noise_seed >= 0 else None,
                    worker=worker_node(), held_out=lambda: task.test)
    return source


def simulated_profile(run: RunConfig, index: int, node_config: Mapping[str, Any]
                      ) -> SiloProfile | None:
    """The node config's declaration first, else the simulation mix's profile; None when
    auto-configuration is off."""
    declared = SiloProfile.from_node_config(node_config)
    if declared is not None or run.profiles == "":
        return declared
    if run.profiles == "node":
        raise ProfileError("the run asks each silo for its profile ('node') but this "
                           f"silo's node config declares none: add {', '.join(RESOURCE_KEYS)}")
    return mix_profiles(run.profiles, run.num_silos)[index]
