"""`silotune run`'s exit status comes from how the coordinator says the run ended, read
from the JSON that Flower's own CLI code writes (so a format change in Flower fails
here, not silently in a deployment)."""

from __future__ import annotations

import json

import pytest
from flwr.cli.ls import _to_json
from flwr.cli.run_utils import RunRow

from silotune.deploy.connection import DeployError
from silotune.deploy.submit import run_outcome, started_run_id


def _listed(run_id: int, status: str, details: str) -> str:
    """What ``flwr ls --run-id ID --format json`` prints for one run."""
    row = RunRow(run_id=run_id, federation_id="", fab_id="silotune/silotune",
                 fab_version="0.1.0", fab_hash="ab" * 32, status_text=status,
                 details=details, elapsed=3.0, pending_at="N/A", starting_at="N/A",
                 running_at="N/A", finished_at="N/A", network_traffic_inbound=0,
                 network_traffic_outbound=0, compute_time_serverapp=0.0,
                 compute_time_clientapp=0.0)
    return _to_json([row])


def test_only_a_completed_run_succeeds():
    done = run_outcome(7, _listed(7, "finished:completed", "N/A"))
    assert done.completed and done.line() == "[run] run 7 finished:completed"
    why = "ServerApp failed with exception: only 2 silos connected; need at least 3"
    failed = run_outcome(7, _listed(7, "finished:failed", why))
    assert not failed.completed and failed.line() == f"[run] run 7 finished:failed: {why}"
    stopped = run_outcome(7, _listed(7, "finished:stopped", "N/A"))
    assert not stopped.completed
    running = run_outcome(7, _listed(7, "running", "N/A"))
    assert not running.completed and "the run may go on there" in running.line()


def test_a_run_that_did_not_start_or_cannot_be_asked_about_raises_with_the_reason():
    assert started_run_id(json.dumps({"success": True, "run-id": "12"})) == 12
    refused = json.dumps({"success": False, "error-message": "Connection to the "
                          "SuperLink is unavailable."})
    with pytest.raises(DeployError, match="did not start the run: Connection to the"):
        started_run_id(refused)
    with pytest.raises(DeployError, match="how run 7 ended: Connection to the"):
        run_outcome(7, refused)
    with pytest.raises(DeployError, match="how run 7 ended"):
        run_outcome(7, _listed(8, "finished:completed", "N/A"))  # another run
    with pytest.raises(DeployError, match="gave no JSON answer; it said:\nTraceback"):
        started_run_id("Traceback (most recent call last): ...")
