"""`silotune simulate --ray-address` on a Ray cluster of two nodes started as processes.

A Ray head and a worker node (`ray start --head`, `ray start --address ...`, one CPU
each, a private temp dir and free ports) form the cluster; a tiny non-private
federation runs on it. Every silo records the Ray node that trained it: both nodes must
appear, and the results must equal a single-node run with the same seed, to the bit.

Teardown stops only this cluster: `ray stop` would stop every Ray process on the machine
(other users' too), so the processes whose command line names this cluster's private
temp dir are terminated instead.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

pytestmark = pytest.mark.integration
RAY = Path(sys.executable).with_name("ray")


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_ports() -> list[str]:
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    return [f"--{n}={p}" for n, p in zip(names, _free_ports(len(names)), strict=True)]


def _stop_cluster(temp: Path, gcs_port: int) -> None:
    """Terminate the processes of the cluster whose temp dir is `temp` or whose GCS is on
    `gcs_port` (the Ray client server names only the latter), and only those."""
    gcs = f":{gcs_port}"
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            args = proc.info["cmdline"] or []
            if any(str(temp) in arg or (arg.startswith("--address=") and arg.endswith(gcs))
                   for arg in args):
                mine.append(proc)
        except psutil.Error:
            continue
    for proc in mine:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(mine, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    temp = Path(tempfile.mkdtemp(prefix="st-ray-", dir="/tmp"))  # short: socket paths
    gcs, client = _free_ports(2)
    address = f"127.0.0.1:{gcs}"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000",
              f"--temp-dir={temp}", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        head = subprocess.run(
            [str(RAY), "start", "--head", f"--port={gcs}", f"--ray-client-server-port={client}",
             "--include-dashboard=false", *common, *_node_ports()],
            capture_output=True, text=True, timeout=180, env=env)
        assert head.returncode == 0, head.stdout[-3000:] + head.stderr[-3000:]
        worker = subprocess.run(
            [str(RAY), "start", f"--address={address}", *common, *_node_ports()],
            capture_output=True, text=True, timeout=180, env=env)
        assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
        yield address
    finally:
        _stop_cluster(temp, gcs)
        shutil.rmtree(temp, ignore_errors=True)


def _start_simulation(out: Path, model: Path, data: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    out.mkdir(parents=True)
    log = (out.parent / f"{out.name}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "silotune.cli", "simulate", "--model", str(model),
         "--dataset", str(data), "--silos", "4", "--rounds", "2", "--local-steps", "2",
         "--batch-size", "8", "--ranks", "4,2", "--test-size", "30", "--epsilon", "inf",
         "--partition", "iid", "--seed", "5", "--out", str(out), *extra],
        cwd=out.parent, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, out: Path) -> dict:
    try:
        code = proc.wait(timeout=600)
    finally:
        proc.kill()
    log = (out.parent / f"{out.name}.log").read_text()
    assert code == 0, log[-6000:]
    metrics: dict = json.loads((out / "metrics.json").read_text())
    return metrics


def test_silos_run_on_both_nodes_and_match_one_machine(ray_cluster, tiny_model_dir,
                                                        toy_dataset_file, tmp_path):
    # both at once (the results do not depend on timing): the cluster and a private Ray
    on_cluster = _start_simulation(tmp_path / "cluster", tiny_model_dir, toy_dataset_file,
                                   "--ray-address", ray_cluster)
    on_one = _start_simulation(tmp_path / "local", tiny_model_dir, toy_dataset_file)
    cluster = _finish(on_cluster, tmp_path / "cluster")
    local = _finish(on_one, tmp_path / "local")

    nodes = {node for row in cluster["rounds"] for node in row["workers"].values()}
    assert len(nodes) == 2, cluster["rounds"]  # silos trained on the head and the worker
    for row in cluster["rounds"]:
        assert sorted(row["workers"]) == ["silo-000", "silo-001", "silo-002", "silo-003"]
    local_nodes = {node for row in local["rounds"] for node in row["workers"].values()}
    assert len(local_nodes) == 1 and not local_nodes & nodes  # its own private Ray

    for a, b in zip(cluster["rounds"], local["rounds"], strict=True):
        assert (a["accuracy"], a["loss"], a["bytes_up"]) == (b["accuracy"], b["loss"],
                                                             b["bytes_up"])
        assert a["participants"] == b["participants"] and a["excluded"] == b["excluded"] == []
    with np.load(tmp_path / "cluster" / "checkpoint" / "updates.npz") as c, \
            np.load(tmp_path / "local" / "checkpoint" / "updates.npz") as loc:
        assert sorted(c.files) == sorted(loc.files) and c.files
        for key in c.files:
            assert np.array_equal(c[key], loc[key]), key
