"""Scale helpers: the lazy roster (only sampled silos contacted), progress lines, the
Ray backend config and per-silo worker recording."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.supercore.task_identity import TaskIdentity

from silotune.config import ConfigError, RunConfig
from silotune.progress import Tracker, track
from silotune.protocol import keys as P
from silotune.protocol.messages import Hello
from silotune.server.roster import Roster, broadcast
from silotune.simulations.cluster import backend_config, worker_node


class FakeGrid:
    """`n` nodes registered in order (partition i = i-th registered); answers hellos."""

    def __init__(self, n: int, broken: frozenset[int] = frozenset(),
                 silent: frozenset[int] = frozenset(),
                 claims: dict[int, int] | None = None, named: bool = False) -> None:
        start = datetime(2026, 1, 1, tzinfo=UTC)
        ids = random.Random(7).sample(range(10**6, 10**7), n)  # random ids, as Flower's
        self.partition = {node: i for i, node in enumerate(ids)}
        # named: each key registered under its silo's name, as `register-silo --name`
        self.infos = [NodeInfo(node_id=node, registered_at=(start + timedelta(
            microseconds=i)).isoformat(), name=f"silo-{i:05d}" if named else None)
            for i, node in enumerate(ids)]
        self.hellos: list[int] = []
        self.broken, self.silent = broken, silent
        self.claims = claims or {}  # partition -> the partition whose silo id it claims

    def get_node_ids(self) -> list[int]:
        return sorted(self.partition)

    def get_nodes(self) -> list[NodeInfo]:
        return list(reversed(self.infos))  # any order: the roster sorts

    def send_and_receive(self, messages: list[Any], timeout: float) -> list[Any]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.hellos.append(node)
            msg.metadata.__dict__["_message_id"] = f"ask-{len(self.hellos)}"  # as Flower's push
            meta = SimpleNamespace(src_node_id=node, reply_to_message_id=msg.metadata.message_id)
            if self.partition[node] in self.silent:
                continue
            if self.partition[node] in self.broken:  # made by the SuperLink: from node 1
                meta.src_node_id = 1
                replies.append(SimpleNamespace(metadata=meta, has_error=lambda: True,
                                               error=SimpleNamespace(reason="disk full")))
                continue
            index = self.claims.get(self.partition[node], self.partition[node])
            content = RecordDict({P.INFO: ConfigRecord({P.SILO_ID: f"silo-{index:05d}"}),
                                  P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10 + index})})
            replies.append(SimpleNamespace(metadata=meta, has_error=lambda: False,
                                           content=content))
        return replies[::-1]  # replies arrive in any order: here, the last asked first


@pytest.fixture(autouse=True)
def _run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # Flower needs these to build a Message
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_roster_contacts_only_sampled_silos() -> None:
    grid = FakeGrid(10_000)
    roster = Roster(grid, RunConfig(num_silos=10_000, lora_ranks=(8, 4)))  # type: ignore[arg-type]
    assert len(roster) == 10_000 and grid.hellos == []
    rng = random.Random(0)
    for _ in range(3):
        chosen, failed = roster.sample(rng, 10)
        assert len(chosen) == 10 and failed == []
    assert len(grid.hellos) <= 30 and len(roster.silos) == len(set(grid.hellos))
    for silo, info in roster.silos.items():  # position = partition: ids, sizes, ranks
        index = int(silo.split("-")[1])
        assert info.position == index and info.num_examples == 10 + index
        assert info.rank == (8, 4)[index % 2]
    assert roster.ranks() == {"position-0": 8, "position-1": 4}


def test_roster_sampling_is_reproducible_and_hello_happens_once() -> None:
    picks = []
    for _ in range(2):
        grid = FakeGrid(50)
        roster = Roster(grid, RunConfig(num_silos=50))  # type: ignore[arg-type]
        rng = random.Random(3)
        picks.append([roster.sample(rng, 5)[0] for _ in range(4)])
    assert picks[0] == picks[1]  # same seed, same silos, whatever the node ids
    grid = FakeGrid(4)
    roster = Roster(grid, RunConfig(num_silos=4))  # type: ignore[arg-type]
    for _ in range(3):
        assert roster.sample(random.Random(0), 4)[0] == [f"silo-{i:05d}" for i in range(4)]
    assert len(grid.hellos) == 4  # known silos are not asked again


def test_roster_reports_a_failed_hello_as_excluded() -> None:
    grid = FakeGrid(3, broken=frozenset({1}))
    roster = Roster(grid, RunConfig(num_silos=3))  # type: ignore[arg-type]
    chosen, failed = roster.sample(random.Random(0), 3)
    assert chosen == ["silo-00000", "silo-00002"]
    assert len(failed) == 1 and "disk full" in failed[0]["reason"]


def test_a_second_node_claiming_a_known_silo_id_is_left_out() -> None:
    grid = FakeGrid(3, claims={2: 0})  # node of partition 2 claims silo-00000
    roster = Roster(grid, RunConfig(num_silos=3))  # type: ignore[arg-type]
    chosen, failed = roster.sample(random.Random(0), 3)
    assert chosen == ["silo-00000", "silo-00001"]
    assert len(failed) == 1 and "claims silo id 'silo-00000'" in failed[0]["reason"]
    # the first in the roster keeps the id, whatever order the replies arrived in
    assert roster.silos["silo-00000"].position == 0
    assert failed[0]["silo"] == f"node-{roster.nodes[2]}"


def test_a_registered_node_must_claim_its_registered_name() -> None:
    grid = FakeGrid(3, claims={1: 2}, named=True)  # registered as silo-00001
    roster = Roster(grid, RunConfig(num_silos=3))  # type: ignore[arg-type]
    chosen, failed = roster.sample(random.Random(0), 3)
    assert chosen == ["silo-00000", "silo-00002"]  # the real silo-00002 keeps its id
    node = roster.nodes[1]
    assert failed == [{"silo": f"node-{node}", "reason": f"node {node} registered as "
                       "'silo-00001' claims silo id 'silo-00002'"}]


def test_broadcast_matches_replies_by_message_not_sender() -> None:
    grid = FakeGrid(4, broken=frozenset({1}), silent=frozenset({2}))
    roster = Roster(grid, RunConfig(num_silos=4))  # type: ignore[arg-type]
    roster.sample(random.Random(0), 4)  # silos 1 and 2 fail their hello: learn 0 and 3
    known = dict(roster.silos)
    grid.broken, grid.silent = frozenset({3}), frozenset({0})
    replies, excluded = broadcast(grid, known, Hello(), 1.0)
    assert replies == {}
    assert excluded == [{"silo": "silo-00003", "reason": "disk full"},
                        {"silo": "silo-00000", "reason": "no reply before the timeout"}]
    grid.broken = grid.silent = frozenset()
    replies, excluded = broadcast(grid, known, Hello(), 1.0)
    assert sorted(replies) == ["silo-00000", "silo-00003"] and excluded == []


def test_progress_plain_lines_off_a_terminal() -> None:
    lines: list[str] = []
    assert list(track(range(3), "rounds", emit=lines.append, bar=False)) == [0, 1, 2]
    assert [line.split(",")[0] for line in lines] == [
        "[rounds] 1/3 done", "[rounds] 2/3 done", "[rounds] 3/3 done"]
    assert "left" in lines[0] and "left" not in lines[-1]
    with Tracker(2, "audit", emit=lines.append, bar=False) as tracker:
        tracker.advance("a.jsonl")
    assert lines[-1].startswith("[audit] 1/2 done (a.jsonl)")


def test_backend_config_local_and_cluster() -> None:
    local = backend_config(num_cpus=3)
    assert local["init_args"]["num_cpus"] == 3 and "address" not in local["init_args"]
    assert local["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}
    joined = backend_config("10.0.0.5:6379")
    assert joined["init_args"]["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in joined["init_args"]  # Ray refuses resources when joining
    with pytest.raises(ConfigError, match="HOST:PORT"):
        backend_config("10.0.0.5")
    assert worker_node()  # outside Ray: the host name
