"""The coordinator's view of the silos: every node, but only sampled silos contacted.

With 10,000 simulated silos and 10 sampled per round, asking every node for its id and
size before round 1 would cost 10,000 ClientApp calls (each loading its data) and keep
10,000 records in the coordinator. The roster instead holds the node ids in a fixed
order (a flat list of ints) and says hello to a node only the first time it is sampled;
what it learns (silo id, example count, rank) is kept for those silos alone.

Order: nodes are ordered by registration time, then id. Flower's simulation engine
registers node ``i`` for partition ``i`` in turn, so position ``i`` is silo ``i`` and a
seeded sample of positions picks the same silos in every run with the same seed
(`RunConfig.seed` is public and fixes silo sampling).

Nodes that come online later (an agent started late, or restarted while the coordinator
was down) are not left out for the run: at the start of every round `Roster.refresh`
asks the Grid for the online nodes and greets the new ones, which join the end of the
order (a silo back under a new node id takes its old place), so a silo takes part in
the next round that starts after it is online (docs/architecture.md, one round step 1).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple, TypeVar

from flwr.app import Message
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid

from silotune.config import RunConfig
from silotune.planning.configurator import PlannedSilo
from silotune.planning.profiles import SiloProfile
from silotune.protocol.messages import Hello, HelloReply, Payload

log = logging.getLogger(__name__)
NODE_WAIT_SECONDS = 120.0  # for the nodes to connect
NODE_SETTLE_SECONDS = 10.0
REJOIN_HELLO_SECONDS = 60.0
K = TypeVar("K")


@dataclass
class Silo:
    """What the coordinator knows about one contacted silo, and what it trains."""

    node_id: int
    position: int  # index in the roster (= partition id in simulation)
    num_examples: int | None  # declared public by the silo's operator, or None
    rank: int  # current LoRA rank (HetLoRA may lower it)
    targets: tuple[str, ...]  # adapted weight matrices (FedPipe: per silo)
    batch: int  # expected (Poisson) batch size
    physical_batch: int  # micro-batch of the DP-SGD step
    precision: str  # base precision of the silo's training copy
    profile: SiloProfile | None = None  # declared resources (FedPipe)
    base_version: int = 0  # global rounds the silo confirmed holding: sent only later ones

    def plan(self, planned: PlannedSilo) -> None:
        """Take the FedPipe configurator's choice for this silo."""
        c = planned.best.choice
        self.rank, self.targets, self.precision = c.rank, c.targets, c.precision
        self.batch = self.physical_batch = c.batch  # the memory model's micro-batch


class Answer(NamedTuple):
    """A silo's answer to the hello: who it is, its size and its declared resources."""

    node_id: int
    silo: str
    num_examples: int | None
    profile: SiloProfile | None


class Roster:
    """Connected nodes in a fixed order; silos learned lazily by a hello when sampled."""

    def __init__(self, grid: Grid, cfg: RunConfig,
                 ranks: Mapping[str, int] | None = None) -> None:
        """`ranks`: current ranks of silos known from a checkpoint (a resumed run keeps
        what HetLoRA pruned); other silos start at their position's configured rank."""
        self.grid, self.cfg = grid, cfg
        self._online = _wait_for_nodes(grid, cfg)  # as of the last look at the Grid
        self.nodes: list[int] = _ordered_nodes(grid, self._online)
        self.silos: dict[str, Silo] = {}  # contacted silos only, by silo id
        self._by_node: dict[int, str] = {}
        self._known_ranks = dict(ranks or {})
        self._names: dict[int, str] = {}  # node -> the name its key was registered under

    def __len__(self) -> int:
        return len(self.nodes)

    def ranks(self) -> Mapping[str, int]:
        """Starting rank of each rank class. Ranks cycle over positions, so the first
        ``len(lora_ranks)`` positions show every rank a rule can meet (rules need the set
        of ranks, e.g. to refuse mixed ranks, not one entry per silo)."""
        return {f"position-{i}": self.cfg.rank_of(i)
                for i in range(min(len(self.nodes), len(self.cfg.lora_ranks)))}

    def sample(self, rng: random.Random, k: int) -> tuple[list[str], list[dict[str, str]]]:
        """`k` silos drawn with `rng` (sorted ids), and the sampled nodes that failed to
        answer their first hello (as excluded entries)."""
        positions = sorted(rng.sample(range(len(self.nodes)), k))
        new = [p for p in positions if self.nodes[p] not in self._by_node]
        failed = self._hello(new) if new else []
        chosen = sorted(self._by_node[self.nodes[p]] for p in positions
                        if self.nodes[p] in self._by_node)
        return chosen, failed

    def everyone(self) -> dict[str, Silo]:
        """Contact every node not contacted yet (workflows that need all silos at once:
        CrossLM feedback, FedPipe configuration); the silos that answered, by id."""
        new = [p for p, node in enumerate(self.nodes) if node not in self._by_node]
        for failure in self._hello(new) if new else []:
            log.warning("%s left out: %s", failure["silo"], failure["reason"])
        return self.silos

    def refresh(self) -> None:
        """Look at the Grid's online nodes (the start of a round). Nodes not in the order
        yet are greeted now and join it: a silo back under a new node id (an agent
        restarted without node authentication) takes its old place, any other at the
        end; a node that does not answer joins the end too and is greeted again when
        sampled."""
        self._online = set(self.grid.get_node_ids())
        unseen = self._online - set(self.nodes)
        if not unseen:
            return
        new = _ordered_nodes(self.grid, unseen)
        answers, failed = self._ask(new, REJOIN_HELLO_SECONDS)
        answer_of = {a.node_id: a for a in answers}
        for node in new:  # registration order: the order does not depend on reply order
            if node in answer_of:
                refused = self._admit(answer_of[node], None)
                failed += [refused] if refused else []
            else:
                self.nodes.append(node)
        for failure in failed:
            log.warning("new node %s not admitted yet: %s", failure["silo"],
                        failure["reason"])
        log.info("%d nodes came online; the order now holds %d", len(new), len(self.nodes))

    def _hello(self, positions: list[int]) -> list[dict[str, str]]:
        position_of = {self.nodes[p]: p for p in positions}
        # Often a worker's first ClientApp call (it starts the Ray actor, imports torch):
        # on a loaded machine that takes minutes, so it gets a round's timeout.
        answers, failed = self._ask(list(position_of), self.cfg.round_timeout)
        # in roster order: of two nodes claiming one id (no registered names), the first
        # in the roster keeps it, whatever order the replies arrived in
        for answer in sorted(answers, key=lambda a: position_of[a.node_id]):
            refused = self._admit(answer, position_of[answer.node_id])
            failed += [refused] if refused else []
        return failed

    def _admit(self, answer: Answer, position: int | None) -> dict[str, str] | None:
        """Learn the silo of `answer`, from the node at `position` of the order (None:
        a new node, not in the order yet); an excluded entry when the claim is refused."""
        node, silo = answer.node_id, answer.silo
        known = self.silos.get(silo)
        if known is not None and known.node_id in self._online:
            if position is None:  # in the order, unclaimed: asked again when sampled
                self.nodes.append(node)
            # the first claim stands; the impostor is left out
            return {"silo": f"node-{node}", "reason": f"claims silo id '{silo}', which "
                    f"node {known.node_id} already holds"}
        if known is not None:  # its old node is gone: the silo keeps its place
            log.warning("silo %s rejoined as node %s (was %s)", silo, node, known.node_id)
            if position is not None:  # the old node takes the new one's place
                self.nodes[position] = known.node_id
            self.nodes[known.position] = node
            self._by_node.pop(known.node_id, None)
            known.node_id, known.num_examples = node, answer.num_examples
            self._by_node[node] = silo
            return None
        if position is None:
            position = len(self.nodes)
            self.nodes.append(node)
        rank = self._known_ranks.get(silo, self.cfg.rank_of(position))
        self.silos[silo] = Silo(node, position, answer.num_examples, rank,
                                self.cfg.lora_targets, self.cfg.batch_size,
                                self.cfg.physical_batch_size, self.cfg.base_precision,
                                answer.profile)
        self._by_node[node] = silo
        return None

    def _ask(self, nodes: list[int], timeout: float,
             ) -> tuple[list[Answer], list[dict[str, str]]]:
        """Hello to `nodes`: the answers of those that answer, and the others as excluded
        entries with the reason. A node whose key was registered under a name (every node
        of a deployment: `silotune coordinator register-silo --name`) must claim that
        name as its silo id, so that a silo id always stands for the registered key."""
        replies = exchange(self.grid, {n: Hello().to_message(n) for n in nodes}, timeout)
        names = self._registered_names(nodes)
        answers: list[Answer] = []
        failed = [{"silo": f"node-{n}", "reason": "no hello reply"}
                  for n in nodes if n not in replies]
        for node, reply in replies.items():
            if reply.has_error():
                log.warning("node %s failed the hello: %s", node, reply.error.reason)
                failed.append({"silo": f"node-{node}",
                               "reason": f"hello failed: {reply.error.reason}"})
                continue
            try:
                hello = HelloReply.from_message(reply)
                profile = (SiloProfile.from_node_config(hello.profile) if hello.profile
                           else None)
            except ValueError as err:  # MessageError, ProfileError
                failed.append({"silo": f"node-{node}", "reason": f"bad hello reply: {err}"})
                continue
            except Exception as err:  # a reply may only cost its sender
                log.exception("hello reply of node %s could not be read", node)
                failed.append({"silo": f"node-{node}",
                               "reason": f"bad hello reply: {type(err).__name__}: {err}"})
                continue
            if names.get(node, hello.silo_id) != hello.silo_id:
                failed.append({"silo": f"node-{node}", "reason": f"node {node} registered as "
                               f"'{names[node]}' claims silo id '{hello.silo_id}'"})
                continue
            answers.append(Answer(node, hello.silo_id, hello.num_examples, profile))
        return answers, failed

    def _registered_names(self, nodes: list[int]) -> dict[int, str]:
        """The registered name of each of `nodes` that has one (simulated nodes have
        none); Flower's node list is read again only for nodes not seen before."""
        if any(n not in self._names for n in nodes):
            self._names = {i.node_id: i.name if i.HasField("name") else ""
                           for i in self.grid.get_nodes()}
        return {n: self._names[n] for n in nodes if self._names.get(n)}


def exchange(grid: Grid, asks: Mapping[K, Message], timeout: float) -> dict[K, Message]:
    """Send every message of `asks` and wait up to `timeout` seconds; the replies by the
    key of the message each answers. Replies are matched through `reply_to_message_id`,
    not the sender: error replies made by the SuperLink (e.g. node unavailable) come from
    node 1. Keys without a reply in time are absent."""
    replies = grid.send_and_receive(list(asks.values()), timeout=timeout)
    key_of = {m.metadata.message_id: k for k, m in asks.items()}  # ids set when pushed
    return {key_of[r.metadata.reply_to_message_id]: r for r in replies
            if r.metadata.reply_to_message_id in key_of}


def broadcast(grid: Grid, silos: Mapping[str, Silo], request: Payload, timeout: float,
              ) -> tuple[dict[str, Message], list[dict[str, str]]]:
    """Send the same `request` to every silo: the successful replies by silo, and the
    others as excluded entries (the error's reason, or no reply in time)."""
    replies = exchange(grid, {s: request.to_message(v.node_id)
                              for s, v in sorted(silos.items())}, timeout)
    excluded = [{"silo": s, "reason": str(r.error.reason)}
                for s, r in sorted(replies.items()) if r.has_error()]
    excluded += [{"silo": s, "reason": "no reply before the timeout"}
                 for s in sorted(silos) if s not in replies]
    return {s: r for s, r in replies.items() if not r.has_error()}, excluded


class TooFewSilosError(RuntimeError):
    """Fewer silos are online than the run needs: the run fails instead of going on."""


def _wait_for_nodes(grid: Grid, cfg: RunConfig) -> set[int]:
    """Wait for `cfg.num_silos` nodes, or go on with those present once the count has
    been stable for NODE_SETTLE_SECONDS (at least `cfg.min_replies` of them). The wait
    lasts at most NODE_WAIT_SECONDS or a round's timeout, whichever is shorter.

    Raises
    ------
    TooFewSilosError
        `cfg.min_replies` exceeds `cfg.num_silos`, or fewer than `cfg.min_replies`
        nodes came online in time (no round could aggregate).
    """
    if cfg.min_replies > cfg.num_silos:
        raise TooFewSilosError(f"min-replies = {cfg.min_replies} is more than num-silos = "
                               f"{cfg.num_silos}, so no round could aggregate; lower "
                               "min-replies or raise num-silos")
    wait = min(NODE_WAIT_SECONDS, cfg.round_timeout)
    deadline = time.monotonic() + wait
    nodes = set(grid.get_node_ids())
    stable_since = time.monotonic()
    while len(nodes) < cfg.num_silos and time.monotonic() < deadline:
        if len(nodes) >= cfg.min_replies and time.monotonic() - stable_since > NODE_SETTLE_SECONDS:
            log.warning("going on with %d of %d expected silos", len(nodes), cfg.num_silos)
            break
        time.sleep(0.5)
        now = set(grid.get_node_ids())
        if now != nodes:
            nodes, stable_since = now, time.monotonic()
    if len(nodes) < cfg.min_replies:
        raise TooFewSilosError(
            f"only {len(nodes)} silos online after waiting {wait:.0f} s, and the run needs "
            f"min-replies = {cfg.min_replies}: start the missing agents (`silotune agent`) "
            "and submit the run again (add --resume to continue a checkpointed run), or "
            "lower min-replies")
    return nodes


def _ordered_nodes(grid: Grid, nodes: set[int]) -> list[int]:
    """`nodes` by registration time, then id (simulation: partition order)."""
    def key(info: NodeInfo) -> tuple[datetime, int]:
        try:
            when = datetime.fromisoformat(info.registered_at)
        except ValueError:
            when = datetime.min
        if when.tzinfo is not None:
            when = when.astimezone(UTC).replace(tzinfo=None)
        return when, info.node_id

    infos = [i for i in grid.get_nodes() if i.node_id in nodes]
    ordered = [i.node_id for i in sorted(infos, key=key)]
    missing = sorted(nodes - set(ordered))  # a grid without node info: by id
    return ordered + missing
