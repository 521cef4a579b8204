"""Issue 5 acceptance with real processes on 127.0.0.1: `silotune certs`, `coordinator`
(flower-superlink, TLS + node authentication + SQLite state), `agent` (flower-supernode)
and `run` (flwr run), on the tiny random Llama from conftest.

One coordinator serves the module (the silos dial its public address, the operator
registers silos and submits runs through its loopback operator port); tests run in file
order:

1. rejections: an unregistered key, a wrong CA, an unreachable coordinator, and a
   coordinator without certificates (refuses) or with --insecure (warns);
2. an outsider holding ca.crt and the silos' address can neither list, register or
   unregister nodes nor start a run, and a request body over the cap gets 413
   (issue 15, docs/flower.md §8);
3. a private 3-silo, 3-round federation with TLS and node auth: one agent is killed
   during round 2 and restarted (the round completes without it, it rejoins in round 3
   and its ledger continues), and the coordinator is killed after round 2 and restarted
   with `silotune run --resume` (no ledger shows a round twice);
4. a non-private run killed after round 1 of 3 and resumed ends with exactly the global
   state of an uninterrupted run with the same seed;
5. runs that fail (fewer silos online than min-replies, a test-size the data cannot
   give) make `silotune run` exit non-zero with the reason.

Before a resumed run, the tests wait until the coordinator reports every running agent
online (`flwr supernode list`), so that the resumed run sees the same silos.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from silotune.deploy.connection import CONNECTION, Connection, run_flwr, write_flwr_home
from silotune.deploy.superlink import DEFAULT_MAX_REQUEST_MIB, MIB
from silotune.privacy.ledger import verify_ledger
from tests.conftest import toy_frame
from tests.integration.deployment import (
    Process,
    checkpoint_round,
    declare_post,
    flwr,
    flwr_json,
    free_port,
    silotune,
    wait_until,
)

pytestmark = pytest.mark.integration

SILOS = ("a", "b", "c")
STRANGER_APP = {  # a complete Flower App, as an outsider would submit it
    "pyproject.toml": """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "stranger"
version = "1.0.0"
dependencies = ["flwr"]

[tool.flwr.app]
publisher = "stranger"

[tool.flwr.app.components]
serverapp = "stranger_app:server"
clientapp = "stranger_app:client"
""",
    "stranger_app.py": """from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()
""",
}


class Consortium:
    """A coordinator with TLS and node auth, three registered silos, one stranger."""

    def __init__(self, root: Path, model: Path, dataset: Path) -> None:
        self.root, self.model, self.dataset = root, model, dataset
        self.certs = root / "certs"
        made = silotune("certs", "--out", str(self.certs), "--host", "127.0.0.1",
                        "--app-signing", *[f"--silo={s}" for s in (*SILOS, "stranger")])
        assert made.returncode == 0, made.stderr
        for i, silo in enumerate(SILOS):
            toy_frame(60, seed=i + 1).to_json(root / f"{silo}.jsonl", orient="records",
                                              lines=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"  # the silos' address
        self.operator_port = free_port()
        self.operator_home = root / "coordinator" / "flwr"  # written by the coordinator
        self.restarts = 0
        self.coordinator = self.start_coordinator()
        for silo in SILOS:
            reg = silotune(*self._coordinator_args(), "register-silo",
                           str(self.certs / "silos" / silo / "node.pub"), "--name", silo)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        self.agents: dict[str, Process] = {}

    def _coordinator_args(self) -> list[str]:
        return ["coordinator", "--state-dir", str(self.root / "coordinator"),
                "--certs", str(self.certs), "--port", str(self.port),
                "--operator-port", str(self.operator_port)]

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
                "--app-key", str(self.certs / "app-signing.pub"),
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
        return ["run", "--operator-port", str(self.operator_port),
                "--ca", str(self.certs / "ca.crt"),
                "--app-key", str(self.certs / "app-signing.key"), "--out", str(out),
                *[f"--config={k}={v}" for k, v in settings.items()]]

    def kill_coordinator_after(self, out: Path, round_: int, run: Process) -> dict:
        """Stop the coordinator once `round_` is checkpointed; restart it; return the
        checkpoint state it left."""
        wait_until(lambda: checkpoint_round(out) >= round_, 400, f"round {round_} of {out}")
        self.coordinator.stop()
        state = json.loads((out / "checkpoint" / "state.json").read_text())
        run.stop(signal.SIGINT)  # `flwr run --stream` lost its coordinator
        self.coordinator = self.start_coordinator()
        return state

    def online_nodes(self) -> set[str]:
        """Node ids the coordinator reports online (`flwr supernode list`, operator)."""
        listed = run_flwr(["supernode", "list", CONNECTION, "--format", "json"],
                          self.operator_home, capture=True)
        try:
            nodes = json.loads(listed.stdout).get("nodes", [])
        except ValueError:  # the coordinator is still starting
            return set()
        return {str(n["node-id"]) for n in nodes if n.get("status") == "online"}

    def running_agents(self) -> list[Process]:
        return [p for p in self.agents.values() if p.proc.poll() is None]

    def wait_online(self, agents: list[Process]) -> None:
        """Wait until the coordinator reports each of `agents` online."""
        wanted = {re.findall(r"SuperNode ID: (\d+)", a.log())[-1] for a in agents}
        wait_until(lambda: wanted <= self.online_nodes(), 300,
                   f"agents {[a.name for a in agents]} online")

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
                                str(tmp_path / "insecure"), "--port", str(free_port()),
                                "--operator-port", str(free_port())], tmp_path)
    try:
        loud.wait_for("Starting Flower SuperExec")
        assert "running INSECURE" in loud.log()
    finally:
        assert loud.stop() == 0


def _nodes(consortium: Consortium) -> list[tuple[str, str]]:
    """(node id, status) of every node, as the operator lists them (operator port)."""
    listed = flwr_json(consortium.operator_home, "supernode", "list", CONNECTION)
    return sorted((n["node-id"], n["status"]) for n in listed["nodes"])


def test_outsiders_cannot_drive_the_coordinator(consortium, tmp_path):
    before = _nodes(consortium)
    assert len(before) == len(SILOS)  # the operator registered them via the operator port
    outsider = write_flwr_home(tmp_path / "outsider",
                               Connection(consortium.address, consortium.certs / "ca.crt"))
    app = tmp_path / "app"
    app.mkdir()
    for name, text in STRANGER_APP.items():
        (app / name).write_text(text)
    attempts = {
        "list": ["supernode", "list", CONNECTION],
        "register": ["supernode", "register",
                     str(consortium.certs / "silos" / "stranger" / "node.pub"), CONNECTION],
        "unregister": ["supernode", "unregister", before[0][0], CONNECTION],
        "run": ["run", str(app), CONNECTION],
    }
    for what, args in attempts.items():
        done = flwr(outsider, *args)
        assert done.returncode != 0, f"{what} was not refused: {done.stdout}{done.stderr}"
        assert "operator port" in done.stdout + done.stderr, (what, done.stdout, done.stderr)

    assert _nodes(consortium) == before  # nothing registered, nothing unregistered
    assert flwr_json(consortium.operator_home, "ls", CONNECTION)["runs"] == []
    cap = DEFAULT_MAX_REQUEST_MIB * MIB
    assert declare_post(consortium.address, consortium.certs / "ca.crt",
                        "/v1/fleet/push-object", cap + 1) == 413
    assert consortium.coordinator.proc.poll() is None


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
    consortium.wait_online(list(agents.values()))  # a and b reconnected, c is back

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
    # min-replies = 2: neither run may go on with one silo (it waits for both, and a
    # round with fewer replies changes nothing), so a late silo cannot pass unnoticed
    settings = ("num-silos=2", "min-replies=2", "target-epsilon=inf", "seed=3")
    agents = consortium.running_agents()
    assert len(agents) == 2  # a and b, left running by the test above
    consortium.wait_online(agents)
    plain = consortium.run_args(consortium.root / "uninterrupted", *settings)
    done = silotune(*plain, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "NON-PRIVATE" in done.stdout and "finished:completed" in done.stdout

    out = consortium.root / "interrupted"
    args = consortium.run_args(out, *settings)
    saved = consortium.kill_coordinator_after(out, 1, Process("run-i", args, consortium.root))
    consortium.wait_online(agents)  # both reconnected to the restarted coordinator
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


def test_a_failed_run_exits_non_zero_and_says_why(consortium):
    online = len(consortium.online_nodes())  # 2 after the tests above
    more = online + 1
    too_few = silotune(*consortium.run_args(
        consortium.root / "too-few", f"num-silos={more}", f"min-replies={more}",
        "round-timeout=5"), timeout=600)  # waits for silos at most round-timeout
    assert too_few.returncode == 1, too_few.stdout[-3000:] + too_few.stderr[-3000:]
    assert "finished:failed: ServerApp failed with exception: only " \
           f"{online} silos online after waiting 5 s, and the run needs min-replies = " \
           f"{more}: start the missing agents" in too_few.stderr
    assert "[run] exit status 1" in too_few.stderr

    split = silotune(*consortium.run_args(consortium.root / "bad-split", "num-silos=2",
                                          "test-size=1000"), timeout=600)
    assert split.returncode == 1, split.stdout[-3000:] + split.stderr[-3000:]
    assert "finished:failed: ServerApp failed with exception: test-size = 1000, but " \
           "dataset" in split.stderr and "lower test-size to 120 or less" in split.stderr
    assert not (consortium.root / "bad-split" / "metrics.json").exists()


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
