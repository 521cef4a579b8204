"""The Flower App's components (``[tool.flwr.app.components]`` in pyproject.toml).

`flwr run .` and `silotune run` start these. The ServerApp is the coordinator. The
ClientApp serves a deployed silo (a node started by `silotune agent`, whose node config
names its data and state) or, when Flower's Simulation Engine started the node (it
gives each node a ``partition-id``), a simulated silo of the run: decided by what the
operator started, and the deployed path never imports the simulation.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.clientapp import ClientApp

from silotune.client.app import build_client_app
from silotune.client.local import Silo, deployed_silo
from silotune.client.node import is_deployed
from silotune.config import RunConfig
from silotune.server.app import build_server_app


def _silo(context: Context) -> Silo:
    if is_deployed(context.node_config):
        return deployed_silo(context)
    from silotune.simulations.silos import simulated_silos  # a simulation started us

    return simulated_silos(RunConfig.from_mapping(context.run_config))(context)


server_app = build_server_app()
client_app: ClientApp = build_client_app(_silo)

__all__ = ["client_app", "server_app"]
