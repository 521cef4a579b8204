"""The coordinator as a Flower ServerApp (thin: config in, round loop out)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from silotune.config import RunConfig
from silotune.progress import Emit
from silotune.server.crosslm import run_crosslm
from silotune.server.loop import run_federation

# Run modes (RunConfig.mode): the coordinator's workflow for each.
WORKFLOWS: dict[str, Callable[[Grid, RunConfig, Emit], dict[str, Any]]] = {
    "lora": run_federation,
    "crosslm": run_crosslm,
}


def build_server_app(preset: RunConfig | None = None, progress: Emit = print) -> ServerApp:
    """The ServerApp; `preset` fixes the run config (``silotune simulate``), else it is
    read from Flower's run config (``flwr run .``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = preset or RunConfig.from_mapping(context.run_config)
        WORKFLOWS[cfg.mode](grid, cfg, progress)

    return app

