"""Issue 5 acceptance with real processes on 127.0.0.1: `silotune certs`, `coordinator`
(flower-superlink, TLS + node authentication + SQLite state), `agent` (flower-supernode)
and `run` (flwr run), on the tiny random Llama from conftest.

One coordinator serves the module; tests run in file order:

1. rejections: an unregistered key, a wrong CA, an unreachable coordinator, and a
   coordinator without certificates (refuses) or with --insecure (warns);
2. a private 3-silo, 3-round federation with TLS and node auth: one agent is killed
   during round 2 and restarted (the round completes without it, it rejoins in round 3
   and its ledger continues), and the coordinator is killed after round 2 and restarted
   with `silotune run --resume` (no ledger shows a round twice);
3. a non-private run killed after round 1 of 3 and resumed ends with exactly the global
   state of an uninterrupted run with the same seed.
"""

from __future__ import annotations

import itertools
import json
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from silotune.privacy.ledger import verify_ledger
from tests.conftest import toy_frame
from tests.integration.deployment import (
    Process,
    checkpoint_round,
    free_port,
    silotune,
    wait_until,
)

pytestmark = pytest.mark.integration

SILOS = ("a", "b", "c")


class Consortium:
    """A coordinator with TLS and node auth, three registered silos, one stranger."""

    def __init__(self, root: Path, model: Path, dataset: Path) -> None:
        self.root, self.model, self.dataset = root, model, dataset
        self.certs = root / "certs"
        made = silotune("certs", "--out", str(self.certs), "--host", "127.0.0.1",
                        *[f"--silo={s}" for s in (*SILOS, "stranger")])
        assert made.returncode == 0, made.stderr
        for i, silo in enumerate(SILOS):
            toy_frame(60, seed=i + 1).to_json(root / f"{silo}.jsonl", orient="records",
                                              lines=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.restarts = 0
        self.coordinator = self.start_coordinator()
        for silo in SILOS:
            reg = silotune(*self._coordinator_args(), "register-silo",
                           str(self.certs / "silos" / silo / "node.pub"), "--name", silo)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        self.agents: dict[str, Process] = {}

    def _coordinator_args(self) -> list[str]:
        return ["coordinator", "--state-dir", str(self.root / "coordinator"),
                "--certs", str(self.certs), "--port", str(self.port)]

    def start_coordinator(self) -> Process:
        proc = Process(f"coordinator-{self.restarts}", self._coordinator_args(), self.root)
        self.restarts += 1
        proc.wait_for("Starting Flower SuperExec")
        return proc

    def agent_args(self, silo: str, *, key: str | None = None, ca: Path | None = None,
                   address: str | None = None) -> list[str]:
        return ["agent", "--coordinator", address or self.address,
                "--ca", str(ca or self.certs / "ca.crt"),
                "--key", str(self.certs / "silos" / (key or silo) / "node.key"),
                "--silo-id", silo, "--data", str(self.root / f"{silo}.jsonl"),
                "--state-dir", str(self.root / "silo-state" / silo),
                "--epsilon", "inf", "--delta", "1e-5",  # the silos follow each run's target
                "--runtime-port", str(free_port())]

    def start_agent(self, silo: str) -> Process:
        proc = Process(f"agent-{silo}-{len(self.agents)}", self.agent_args(silo), self.root)
        self.agents[proc.name] = proc
        proc.wait_for("SuperNode ID:")
        return proc

    def run_args(self, out: Path, *config: str) -> list[str]:
        settings = {"model": str(self.model), "dataset": str(self.dataset),
                    "num-server-rounds": "3", "local-steps": "2", "batch-size": "16",
                    "lora-ranks": "4,2", "test-size": "30", "round-timeout": "300"}
        settings.update(dict(c.split("=", 1) for c in config))
        return ["run", "--coordinator", self.address, "--ca", str(self.certs / "ca.crt"),
                "--out", str(out), *[f"--config={k}={v}" for k, v in settings.items()]]

    def kill_coordinator_after(self, out: Path, round_: int, run: Process) -> dict:
        """Stop the coordinator once `round_` is checkpointed; restart it; return the
        checkpoint state it left."""
        wait_until(lambda: checkpoint_round(out) >= round_, 400, f"round {round_} of {out}")
        self.coordinator.stop()
        state = json.loads((out / "checkpoint" / "state.json").read_text())
        run.stop(signal.SIGINT)  # `flwr run --stream` lost its coordinator
        self.coordinator = self.start_coordinator()
        return state

    def close(self) -> None:
        for proc in self.agents.values():
            proc.stop()
        self.coordinator.stop()


@pytest.fixture(scope="module")
def consortium(tiny_model_dir, toy_dataset_file, tmp_path_factory) -> Iterator[Consortium]:
    group = Consortium(tmp_path_factory.mktemp("deploy"), tiny_model_dir, toy_dataset_file)
    try:
        yield group
    finally:
        group.close()


def _ledger(consortium: Consortium, silo: str) -> list[dict]:
    path = consortium.root / "silo-state" / silo / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rejections_are_clear(consortium, tmp_path):
    stranger = silotune(*consortium.agent_args("a", key="stranger"))
    assert stranger.returncode == 2
    assert "not registered" in stranger.stderr and "register-silo" in stranger.stderr

    other = silotune("certs", "--out", str(tmp_path / "other"), "--host", "127.0.0.1")
    assert other.returncode == 0
    wrong_ca = silotune(*consortium.agent_args("a", ca=tmp_path / "other" / "ca.crt"))
    assert wrong_ca.returncode == 2
    assert "does not verify against --ca" in wrong_ca.stderr

    nowhere = silotune(*consortium.agent_args("a", address=f"127.0.0.1:{free_port()}"),
                       "--max-attempts", "2", "--backoff", "0.1")
    assert nowhere.returncode == 2
    assert "attempt 1/2, retrying" in nowhere.stdout
    assert "unreachable after 2 attempts" in nowhere.stderr

    bare = silotune("coordinator", "--state-dir", str(tmp_path / "bare"))
    assert bare.returncode == 2 and "--insecure" in bare.stderr
    loud = Process("insecure", ["coordinator", "--insecure", "--state-dir",
                                str(tmp_path / "insecure"), "--port", str(free_port())],
                   tmp_path)
    try:
        loud.wait_for("Starting Flower SuperExec")
        assert "running INSECURE" in loud.log()
    finally:
        assert loud.stop() == 0


def test_private_federation_survives_a_lost_silo_and_a_coordinator_restart(consortium):
    agents = {silo: consortium.start_agent(silo) for silo in SILOS}
    out = consortium.root / "private"
    args = consortium.run_args(out, "num-silos=3", "target-epsilon=8")
    run = Process("run-private", args, consortium.root)

    wait_until(lambda: checkpoint_round(out) >= 1, 400, "round 1")
    assert agents["c"].stop() == 0  # silo c goes down during round 2 ...
    saved = consortium.kill_coordinator_after(out, 2, run)
    # ... and comes back only after round 2 (restarted at once, on an idle machine it
    # could still answer round 2 under its registered node id)
    agents["c"] = consortium.start_agent("c")

    resumed = silotune(*args, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"[resume] {saved['federation_id']}: rounds 1-2 of 3" in resumed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert metrics["federation_id"] == saved["federation_id"]
    round1, round2, round3 = metrics["rounds"]
    assert round1["participants"] == ["a", "b", "c"]
    assert round2["participants"] == ["a", "b"]
    assert [e["silo"] for e in round2["excluded"]] == ["c"]
    assert round3["participants"] == ["a", "b", "c"]  # c rejoined
    final = json.loads((out / "checkpoint" / "state.json").read_text())
    assert final["fingerprints"][:2] == saved["fingerprints"]  # resumed from round 2

    for silo in SILOS:
        entries = _ledger(consortium, silo)
        rounds = [(e["run_id"], e["round"]) for e in entries]
        assert len(rounds) == len(set(rounds)), f"{silo} shows a round twice: {rounds}"
        assert {e["run_id"] for e in entries} == {saved["federation_id"]}
        assert [e["seq"] for e in entries] == list(range(len(entries)))
        eps = [e["epsilon"] for e in entries]
        assert all(x < y for x, y in itertools.pairwise(eps)) and eps[-1] <= 8.0
        assert len(entries[-1]["accounting_history"]) == len(entries)  # budget kept
        assert verify_ledger(consortium.root / "silo-state" / silo / "ledger.jsonl") == []
        assert metrics["rounds"][-1]["epsilon"][silo] == pytest.approx(eps[-1])
    assert {e["round"] for e in _ledger(consortium, "c")} >= {1, 3}
    assert agents["c"].stop() == 0  # the next test runs with silos a and b


def test_resumed_non_private_run_equals_an_uninterrupted_one(consortium):
    plain = consortium.run_args(consortium.root / "uninterrupted", "num-silos=2",
                                "target-epsilon=inf", "seed=3")
    done = silotune(*plain, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "NON-PRIVATE" in done.stdout

    out = consortium.root / "interrupted"
    args = consortium.run_args(out, "num-silos=2", "target-epsilon=inf", "seed=3")
    saved = consortium.kill_coordinator_after(out, 1, Process("run-i", args, consortium.root))
    resumed = silotune(*args, "--resume", timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "rounds 1-1 of 3" in resumed.stdout

    final = json.loads((out / "checkpoint" / "state.json").read_text())
    assert final["round"] == 3 and final["fingerprints"][:1] == saved["fingerprints"]
    reference = json.loads((consortium.root / "uninterrupted" / "checkpoint" /
                            "state.json").read_text())
    assert final["fingerprints"] == reference["fingerprints"]
    with np.load(out / "checkpoint" / "updates.npz") as got, \
            np.load(consortium.root / "uninterrupted" / "checkpoint" / "updates.npz") as want:
        assert sorted(got.files) == sorted(want.files) and len(got.files) > 0
        for key in want.files:
            np.testing.assert_array_equal(got[key], want[key])
    ours = json.loads((out / "metrics.json").read_text())["rounds"]
    theirs = json.loads((consortium.root / "uninterrupted" / "metrics.json").read_text())
    assert [r["accuracy"] for r in ours] == [r["accuracy"] for r in theirs["rounds"]]
    assert [r["loss"] for r in ours] == [r["loss"] for r in theirs["rounds"]]


def test_state_and_run_outputs_are_private_to_their_service(consortium):
    """Issue 15: state directories 0700 and every file in them 0600 (the coordinator's
    superlink.db and registry, each silo's ledger and keys), as are a run's outputs."""
    roots = [consortium.root / "coordinator", consortium.root / "private",
             *(consortium.root / "silo-state" / silo for silo in SILOS)]
    assert (consortium.root / "coordinator" / "superlink.db").is_file()
    assert all((consortium.root / "silo-state" / s / "ledger.jsonl").is_file() for s in SILOS)
    loose = [f"{path.relative_to(consortium.root)} {stat.S_IMODE(path.lstat().st_mode):o}"
             for root in roots for path in (root, *root.rglob("*"))
             if not path.is_symlink() and path.lstat().st_mode & 0o077]
    assert loose == [], f"readable by group or others: {loose}"
