"""The roster looks at the Grid at the start of every round: a silo that comes online
later joins the next round, a silo back under a new node id keeps its place, an
impostor stays out. Too few silos, or a held-out split the data cannot give, fail the
run with the fix in the message."""

from __future__ import annotations

import random
from typing import Any

import pytest
from flwr.supercore.task_identity import TaskIdentity

from silotune.config import ConfigError, RunConfig
from silotune.server.loop import evaluation_split
from silotune.server.roster import Roster, TooFewSilosError
from tests.unit.server.test_scale import FakeGrid


class ComingAndGoing(FakeGrid):
    """A FakeGrid whose nodes are online only while their partition is in `online`; a
    message to an offline node gets no reply."""

    def __init__(self, n: int, online: set[int], claims: dict[int, int] | None = None):
        super().__init__(n, claims=claims)
        self.online = online
        self.node = {i: node for node, i in self.partition.items()}

    def get_node_ids(self) -> list[int]:
        return sorted(self.node[i] for i in self.online)

    def send_and_receive(self, messages: list[Any], timeout: float) -> list[Any]:
        self.silent = frozenset(set(self.node) - self.online)
        return super().send_and_receive(messages, timeout)


@pytest.fixture(autouse=True)
def _run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # Flower needs these to build a Message
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _all(roster: Roster) -> list[str]:
    return roster.sample(random.Random(0), len(roster))[0]


def test_a_silo_online_after_the_start_joins_the_next_round() -> None:
    grid = ComingAndGoing(3, online={0, 1})
    roster = Roster(grid, RunConfig(num_silos=2))  # type: ignore[arg-type]
    assert _all(roster) == ["silo-00000", "silo-00001"]
    roster.refresh()
    assert len(roster) == 2  # nothing new
    grid.online.add(2)
    roster.refresh()  # the next round starts: greeted at once, at the end of the order
    assert len(roster) == 3 and roster.silos["silo-00002"].position == 2
    assert roster.silos["silo-00002"].rank == RunConfig().rank_of(2)
    assert _all(roster) == ["silo-00000", "silo-00001", "silo-00002"]
    assert grid.hellos.count(grid.node[2]) == 1


def test_a_new_node_that_does_not_answer_is_greeted_again_when_sampled() -> None:
    grid = ComingAndGoing(3, online={0, 1})
    roster = Roster(grid, RunConfig(num_silos=2))  # type: ignore[arg-type]
    grid.online.add(2)
    grid.broken = frozenset({2})
    roster.refresh()
    assert len(roster) == 3 and "silo-00002" not in roster.silos
    grid.broken = frozenset()
    assert _all(roster) == ["silo-00000", "silo-00001", "silo-00002"]


def test_a_silo_back_under_a_new_node_id_keeps_its_place() -> None:
    grid = ComingAndGoing(4, online={0, 1, 2}, claims={3: 1})  # node 3: silo 1 restarted
    roster = Roster(grid, RunConfig(num_silos=3))  # type: ignore[arg-type]
    assert _all(roster) == ["silo-00000", "silo-00001", "silo-00002"]
    grid.online = {0, 2, 3}
    roster.refresh()
    back = roster.silos["silo-00001"]
    assert back.node_id == grid.node[3] and back.position == 1
    assert roster.nodes == [grid.node[0], grid.node[3], grid.node[2]]
    assert _all(roster) == ["silo-00000", "silo-00001", "silo-00002"]


def test_a_second_node_claiming_an_online_silo_stays_out() -> None:
    grid = ComingAndGoing(4, online={0, 1, 2}, claims={3: 1})
    roster = Roster(grid, RunConfig(num_silos=3))  # type: ignore[arg-type]
    _all(roster)
    grid.online.add(3)
    roster.refresh()
    assert roster.silos["silo-00001"].node_id == grid.node[1] and len(roster) == 4
    chosen, failed = roster.sample(random.Random(0), 4)
    assert chosen == ["silo-00000", "silo-00001", "silo-00002"]
    assert failed == [{"silo": f"node-{grid.node[3]}", "reason": "claims silo id "
                       f"'silo-00001', which node {grid.node[1]} already holds"}]


def test_too_few_silos_fail_the_run_and_say_what_to_do() -> None:
    grid = ComingAndGoing(3, online={0, 1})
    with pytest.raises(TooFewSilosError, match=r"only 2 silos online after waiting 1 s, and "
                       r"the run needs min-replies = 3: start the missing agents"):
        Roster(grid, RunConfig(num_silos=3, min_replies=3, round_timeout=1.0))  # type: ignore[arg-type]
    with pytest.raises(TooFewSilosError, match="min-replies = 4 is more than num-silos = 3"):
        Roster(grid, RunConfig(num_silos=3, min_replies=4))  # type: ignore[arg-type]


def test_a_held_out_split_the_data_cannot_give_fails_the_run(toy_dataset_file) -> None:
    cfg = RunConfig(dataset=str(toy_dataset_file), test_size=30)
    assert len(evaluation_split(cfg).test) == 30
    with pytest.raises(ConfigError, match=r"test-size = 121, but dataset .* \(240 rows\) "
                       r"can hold out only 120 .* lower test-size to 120 or less"):
        evaluation_split(RunConfig(dataset=str(toy_dataset_file), test_size=121))
