"""The sovereign silo, with real processes on 127.0.0.1: a `silotune coordinator`
(flower-superlink, TLS + node authentication), two `silotune agent` silos
(flower-supernode) whose operators set their own privacy policy and pin the consortium's
app-signing key, and signed `silotune run` (flwr run) submissions, on the tiny random
Llama from conftest.

Each silo's policy: epsilon <= 8 over its life, delta 1e-5, at most 20 DP-SGD steps per
federation, at most one FedPipe importance query ever (and a full resource profile).
One consortium serves the module; tests run in file order:

1. an agent without --epsilon, --delta or --app-key does not start;
2. a foreign app submitted to the coordinator without the consortium's signature (one
   that would write into each silo's state folder and read its data) is refused by
   every agent: none of its code is installed or imported, its ServerApp gets the
   refusal as each silo's reply;
3. runs asking for more than the policy allows (a non-private target, a looser delta,
   more steps) are refused by every silo in every round, with the reason recorded in
   metrics.json, and nothing is trained: the ledgers stay empty;
4. a FedPipe run within policy gets its importance query answered (one "importance"
   entry per ledger) and trains; a second FedPipe run's importance query is refused by
   both silos, and the ledgers still hold one "importance" entry each;
5. `silotune audit` verifies both ledgers, each within the silo's epsilon of 8, and the
   agents ran the signed app after verifying it;
6. an agent killed with SIGKILL leaves no process of its SuperNode behind.
"""

from __future__ import annotations

import json
import os
import signal
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from silotune.client.node import DATA_PATH, STATE_DIR
from silotune.deploy.submit import app_dir
from silotune.deploy.verified_clientapp import REFUSED
from tests.conftest import toy_frame
from tests.integration.deployment import Process, free_port, silotune, wait_until

pytestmark = pytest.mark.integration

SILOS = ("a", "b")
POLICY_EPSILON = 8.0
POLICY = ["--epsilon", str(POLICY_EPSILON), "--delta", "1e-5", "--max-steps", "20",
          "--importance-queries", "1"]
PROFILE = ["--memory-gb", "8", "--gflops", "50", "--upload-mbps", "100",
           "--download-mbps", "100", "--round-seconds", "3600"]
RUN_TIMEOUT = 600


class SovereignConsortium:
    """A coordinator with TLS and node auth, and two registered silos with a policy."""

    def __init__(self, root: Path, model: Path, dataset: Path) -> None:
        self.root, self.model, self.dataset = root, model, dataset
        self.certs = root / "certs"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.operator_port = free_port()
        self.coordinator: Process | None = None
        self.agents: dict[str, Process] = {}

    def start(self) -> None:
        """Certificates, silo data, the coordinator, the silos' registration, the agents
        (each online: registered with the coordinator)."""
        made = silotune("certs", "--out", str(self.certs), "--host", "127.0.0.1",
                        "--app-signing", *[f"--silo={s}" for s in SILOS])
        assert made.returncode == 0, made.stderr
        for i, silo in enumerate(SILOS):
            toy_frame(60, seed=i + 1).to_json(self.root / f"{silo}.jsonl",
                                              orient="records", lines=True)
        coordinator_args = ["coordinator", "--state-dir", str(self.root / "coordinator"),
                            "--certs", str(self.certs), "--port", str(self.port),
                            "--operator-port", str(self.operator_port)]
        self.coordinator = Process("coordinator", coordinator_args, self.root)
        self.coordinator.wait_for("Starting Flower SuperExec")
        for silo in SILOS:
            reg = silotune(*coordinator_args, "register-silo",
                           str(self.certs / "silos" / silo / "node.pub"), "--name", silo)
            assert reg.returncode == 0, reg.stdout + reg.stderr
        for silo in SILOS:
            self.agents[silo] = Process(f"agent-{silo}", self.agent_args(silo), self.root)
        for proc in self.agents.values():
            proc.wait_for("SuperNode ID:")

    def agent_args(self, silo: str) -> list[str]:
        return ["agent", "--coordinator", self.address, "--ca", str(self.certs / "ca.crt"),
                "--key", str(self.certs / "silos" / silo / "node.key"),
                "--app-key", str(self.certs / "app-signing.pub"),
                "--silo-id", silo, "--data", str(self.root / f"{silo}.jsonl"),
                "--state-dir", str(self.root / "silo-state" / silo),
                *POLICY, *PROFILE, "--runtime-port", str(free_port())]

    def state_dir(self, silo: str) -> Path:
        return self.root / "silo-state" / silo

    def ledger_path(self, silo: str) -> Path:
        return self.state_dir(silo) / "ledger.jsonl"

    def ledger_bytes(self) -> dict[str, bytes]:
        """Each silo's ledger file as bytes (b"" when there is none)."""
        return {s: self.ledger_path(s).read_bytes() if self.ledger_path(s).exists() else b""
                for s in SILOS}

    def ledger(self, silo: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.ledger_bytes()[silo].splitlines()]

    def run(self, name: str, *config: str) -> dict[str, Any]:
        """Submit a run with the module's small settings (and `config` on top); wait for
        it; return its metrics.json."""
        for silo, proc in self.agents.items():  # both silos online before each run
            assert proc.proc.poll() is None, f"agent {silo} exited:\n{proc.log()[-3000:]}"
        assert self.coordinator is not None and self.coordinator.proc.poll() is None
        settings = {"model": str(self.model), "dataset": str(self.dataset),
                    "num-server-rounds": "2", "local-steps": "2", "batch-size": "16",
                    "lora-ranks": "4", "test-size": "30", "num-silos": "2",
                    "min-replies": "1", "round-timeout": "300"}
        settings.update(dict(c.split("=", 1) for c in config))
        out = self.root / name
        done = silotune("run", "--operator-port", str(self.operator_port),
                        "--ca", str(self.certs / "ca.crt"), "--out", str(out),
                        "--app-key", str(self.certs / "app-signing.key"),
                        *[f"--config={k}={v}" for k, v in settings.items()],
                        timeout=RUN_TIMEOUT)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return json.loads((out / "metrics.json").read_text())

    def close(self) -> None:
        for proc in self.agents.values():
            proc.stop()
        if self.coordinator is not None:
            self.coordinator.stop()


@pytest.fixture(scope="module")
def consortium(tiny_model_dir, toy_dataset_file, tmp_path_factory,
               ) -> Iterator[SovereignConsortium]:
    group = SovereignConsortium(tmp_path_factory.mktemp("sovereign"), tiny_model_dir,
                                toy_dataset_file)
    try:
        group.start()
        yield group
    finally:
        group.close()


def _without(args: list[str], flag: str) -> list[str]:
    i = args.index(flag)
    return args[:i] + args[i + 2:]


@pytest.mark.parametrize("flag", ["--epsilon", "--delta", "--app-key"])
def test_an_agent_without_its_privacy_policy_or_app_key_does_not_start(consortium, flag):
    started = silotune(*_without(consortium.agent_args("a"), flag), timeout=120)
    assert started.returncode == 2
    assert "required" in started.stderr and flag in started.stderr, started.stderr


# The ClientApp a stranger would like every silo to run: it marks its import, writes into
# the silo's state folder and returns the silo's first raw record.
FOREIGN_CLIENT = """\
from pathlib import Path
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

Path({markers!r}, "imported").touch()
app = ClientApp()

@app.query()
def steal(msg: Message, context: Context) -> Message:
    Path(str(context.node_config[{state!r}]), "foreign-app-ran").write_text("ran")
    first = Path(str(context.node_config[{data!r}])).read_text().splitlines()[0]
    return Message(RecordDict({{"loot": ConfigRecord({{"first": first}})}}), reply_to=msg)
"""
FOREIGN_SERVER = """\
import json
from pathlib import Path
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()

@app.main()
def main(grid: Grid, context: Context) -> None:
    asks = [Message(RecordDict(), dst_node_id=n, message_type="query")
            for n in grid.get_node_ids()]
    replies = grid.send_and_receive(asks, timeout=240)
    Path({report!r}).write_text(json.dumps(
        [r.error.reason if r.has_error() else "content" for r in replies]))
"""


def _foreign_app(root: Path, markers: Path, report: Path) -> Path:
    """A 20-line app under its own name, whose run config has silotune's keys, so that
    the operator's own `silotune run --unsigned --app` submits it."""
    ours = tomllib.loads((app_dir() / "pyproject.toml").read_text())
    app = root / "outsider"
    (app / "outsider").mkdir(parents=True)
    (app / "pyproject.toml").write_text(tomli_w.dumps({
        "project": {"name": "outsider", "version": "1.0.0"},
        "tool": {"flwr": {"app": {
            "publisher": "outsider",
            "components": {"serverapp": "outsider.server:app",
                           "clientapp": "outsider.client:app"},
            "config": ours["tool"]["flwr"]["app"]["config"]}}}}))
    (app / "outsider" / "__init__.py").write_text("")
    (app / "outsider" / "client.py").write_text(FOREIGN_CLIENT.format(
        markers=str(markers), state=STATE_DIR, data=DATA_PATH))
    (app / "outsider" / "server.py").write_text(FOREIGN_SERVER.format(report=str(report)))
    return app


def test_an_unsigned_app_is_refused_by_every_silo(consortium, tmp_path):
    markers, report = tmp_path / "markers", tmp_path / "replies.json"
    markers.mkdir()
    app = _foreign_app(tmp_path, markers, report)
    done = silotune("run", "--operator-port", str(consortium.operator_port),
                    "--ca", str(consortium.certs / "ca.crt"), "--unsigned", "--app", str(app),
                    "--out", str(tmp_path / "out"), timeout=RUN_TIMEOUT)
    assert report.exists(), done.stdout[-3000:] + done.stderr[-3000:]

    reasons = json.loads(report.read_text())
    assert len(reasons) == len(SILOS), reasons  # every silo answered, each with a refusal
    for reason in reasons:
        assert "AppSignatureError" in reason and "carries no" in reason, reason
    assert list(markers.iterdir()) == []  # the ClientApp module was never imported
    for silo, agent in consortium.agents.items():
        assert not (consortium.state_dir(silo) / "foreign-app-ran").exists()
        installed = consortium.state_dir(silo) / "flwr" / "apps"
        assert not any(p.name.startswith("outsider.") for p in
                       (installed.iterdir() if installed.exists() else ())), silo
        assert f"{REFUSED} (FAB " in agent.log(), f"{silo} logged no refusal"


@pytest.mark.parametrize(("config", "refused"), [
    ("target-epsilon=inf", "target epsilon inf"),
    ("target-delta=0.05", "target delta 0.05"),
    ("local-steps=20", "plans 40 DP-SGD steps"),  # 2 rounds x 20 > max-steps 20
], ids=["epsilon", "delta", "steps"])
def test_a_request_outside_the_policy_is_refused_and_nothing_is_trained(
        consortium, config, refused):
    before = consortium.ledger_bytes()
    assert before == {s: b"" for s in SILOS}  # no run has trained on these silos yet
    metrics = consortium.run(f"refused-{config.split('=')[0]}", config)

    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for row in metrics["rounds"]:
        assert row["participants"] == []
        assert row["epsilon"] == {}
        reasons = {e["silo"]: e["reason"] for e in row["excluded"]}
        assert sorted(reasons) == list(SILOS), row["excluded"]
        for silo, reason in reasons.items():
            assert reason.startswith("PolicyRefusalError: "), (silo, reason)
            assert refused in reason, (silo, reason)
    assert consortium.ledger_bytes() == before


def test_an_importance_query_is_answered_once_in_a_silos_life(consortium):
    first = consortium.run("importance-1", "profiles=node", "target-epsilon=2")
    assert first["plan"]["importance_refused"] == []
    assert sorted(first["plan"]["silos"]) == list(SILOS)
    assert [r["participants"] for r in first["rounds"]] == [list(SILOS)] * 2
    for silo in SILOS:
        kinds = [(e["type"], e["run_id"]) for e in consortium.ledger(silo)]
        # the query was answered (one DP release, charged first), then the run trained
        assert kinds == [("importance", first["federation_id"])] + [
            ("train", first["federation_id"])] * 2, kinds

    # one round is enough: the query comes before it
    second = consortium.run("importance-2", "profiles=node", "target-epsilon=2",
                            "num-server-rounds=1")
    refused = {e["silo"]: e["reason"] for e in second["plan"]["importance_refused"]}
    assert sorted(refused) == list(SILOS), second["plan"]
    for silo, reason in refused.items():
        assert reason.startswith("PolicyRefusalError: "), (silo, reason)
        assert "importance queries" in reason, (silo, reason)
    # a refused query excludes no silo from training
    assert [r["participants"] for r in second["rounds"]] == [list(SILOS)]
    for silo in SILOS:
        kinds = [(e["type"], e["run_id"]) for e in consortium.ledger(silo)]
        assert [k for k, _ in kinds].count("importance") == 1, kinds
        assert kinds[-1] == ("train", second["federation_id"]), kinds


def test_the_ledgers_verify_within_the_silos_epsilon(consortium):
    for silo in SILOS:
        assert "[silotune] app " in consortium.agents[silo].log()  # verified, then ran
        audit = silotune("audit", str(consortium.ledger_path(silo)), timeout=300)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        entries = consortium.ledger(silo)
        assert entries, f"{silo}'s ledger is empty"
        assert [e["seq"] for e in entries] == list(range(len(entries)))
        assert all(e["epsilon_limit"] == POLICY_EPSILON for e in entries)
        assert entries[-1]["epsilon"] <= POLICY_EPSILON


def test_a_ledger_rolled_back_between_runs_is_refused_and_the_audit_names_the_entry(
        consortium):
    """The coordinator keeps each silo's last ledger head across runs: silo a's ledger put
    back to an earlier copy gets its next reply excluded, and `silotune audit --heads`
    fails naming the entry; the honest ledgers pass (keys trusted on first use)."""
    earlier = consortium.ledger_bytes()["a"]
    honest = consortium.run("heads-honest", "num-server-rounds=1", "target-epsilon=2")
    heads = honest["ledger_heads"]
    assert sorted(heads) == list(SILOS) and not heads["a"]["pinned"], heads
    assert heads["a"]["seq"] == len(consortium.ledger("a")) - 1
    metrics = str(consortium.root / "heads-honest" / "metrics.json")
    for silo in SILOS:
        audit = silotune("audit", "--heads", metrics, str(consortium.ledger_path(silo)),
                         timeout=300)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert "trusted on first use by the coordinator" in audit.stdout
    strict = silotune("audit", "--heads", metrics, "--strict",
                      str(consortium.ledger_path("a")), timeout=300)
    assert strict.returncode == 1 and "--strict needs a key pinned" in strict.stdout

    consortium.ledger_path("a").write_bytes(earlier)  # someone restores an older copy
    rolled = consortium.run("heads-rolled-back", "num-server-rounds=1", "target-epsilon=2")
    seq = heads["a"]["seq"]
    assert rolled["rounds"][0]["participants"] == ["b"], rolled["rounds"][0]
    assert rolled["rounds"][0]["excluded"] == [{"silo": "a", "reason": (
        f"ledger seq {seq} does not extend the last head seq {seq} (rolled back or "
        "truncated?)")}]
    audit = silotune("audit", "--heads", metrics, str(consortium.ledger_path("a")),
                     timeout=300)
    assert audit.returncode == 1, audit.stdout
    assert f"seq {seq}: entry_hash: " in audit.stdout
    assert "the ledger was rolled back or forked" in audit.stdout


def _process_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_sigkilled_agent_leaves_no_supernode(consortium):
    agent = consortium.agents["b"]
    (supernode,) = _children(agent.proc.pid)  # the agent's one child, in its own group
    assert "flower-supernode" in Path(f"/proc/{supernode}/cmdline").read_text()
    assert os.getpgid(supernode) == supernode
    wait_until(lambda: len(_process_group(supernode)) >= 2, 60,
               "the SuperNode's SuperExec")  # the group holds more than the SuperNode
    agent.stop(signal.SIGKILL)
    wait_until(lambda: not _process_group(supernode), 120,
               "the SuperNode's process group to exit with its agent")
    assert _process_group(supernode) == []
