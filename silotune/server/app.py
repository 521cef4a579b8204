"""The coordinator as a Flower ServerApp (thin: config in, round loop out)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from silotune.config import RunConfig
from silotune.server.loop import Progress, run_federation


def build_server_app(preset: RunConfig | None = None, progress: Progress = print) -> ServerApp:
    """The ServerApp; `preset` fixes the run config (``silotune simulate``), else it is
    read from Flower's run config (``flwr run .``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = preset or RunConfig.from_mapping(context.run_config)
        run_federation(grid, cfg, progress)

    return app


app = build_server_app()
