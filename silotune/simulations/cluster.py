"""Where simulated silos run: this machine's Ray, or an existing Ray cluster.

Flower's simulation engine runs each ClientApp call in a Ray actor; its Ray backend calls
``ray.init(**backend_config["init_args"])``. On one machine silotune starts a private Ray
with this machine's CPUs; with ``--ray-address HOST:PORT`` the same run joins a cluster
that was started with ``ray start --head`` / ``ray start --address HOST:PORT`` and spreads
the silos over every node's CPUs (one CPU per ClientApp actor).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from silotune.config import ConfigError


def backend_config(ray_address: str | None = None, num_cpus: int | None = None
                   ) -> dict[str, Any]:
    """Flower simulation ``backend_config``: one CPU per silo actor.

    Parameters
    ----------
    ray_address : str, optional
        ``HOST:PORT`` of a running Ray cluster's head (GCS port). Ray refuses resource
        arguments when it joins a cluster, so none are passed then: the cluster's nodes
        declare their own CPUs (``ray start --num-cpus``).
    num_cpus : int, optional
        CPUs of the private Ray started on this machine (default: all of them).
    """
    init_args: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True,
                                 "include_dashboard": False}
    if ray_address:
        if ":" not in ray_address:
            raise ConfigError(f"--ray-address must be HOST:PORT of the Ray head (the port "
                             f"printed by `ray start --head`), got {ray_address!r}")
        init_args["address"] = ray_address
    else:
        init_args.update(num_cpus=num_cpus or max(1, os.cpu_count() or 1), num_gpus=0)
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


def worker_node() -> str:
    """The Ray node id of the current process when it runs inside Ray, else the host name.

    Recorded per silo and round in metrics.json (``workers``), so a run shows which
    machine trained which silo.
    """
    ray = sys.modules.get("ray")  # only when this process already runs Ray (simulation)
    if ray is not None and ray.is_initialized():
        return str(ray.get_runtime_context().get_node_id())
    return socket.gethostname()
