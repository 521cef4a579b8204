"""The coordinator's round loop (FLoRA by default), on Flower's Grid.

One round (docs/architecture.md): look for silos that came online (they take part from
this round on); sample silos (a hello to those sampled for the first time: the roster
never contacts unsampled silos, so 10,000 silos cost what 10 do); send
each the merged rounds it does not hold yet (all of them to a silo that lost its copy)
plus its own configuration; validate the replies and exclude bad ones (also a reply
whose ledger does not extend the head last accepted from that silo: server/heads.py,
docs/privacy.md "Coordinator-kept heads"); aggregate with
the configured rule; merge into the global base; evaluate on the held-out split; write
metrics and a checkpoint. Flower's `Strategy.start` is not used because the loop needs
the hello handshake, per-silo configuration and replay of the global update history.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from silotune import strategies
from silotune.adapters.codec import update_to_arrays
from silotune.adapters.types import SiloAdapter
from silotune.config import ConfigError, RunConfig
from silotune.files import atomic_write_json, atomic_write_npz
from silotune.ml.assets import resolve_model
from silotune.ml.data import HeldOutSplit, held_out_split
from silotune.ml.lm import (
    check_labels_differ,
    colliding_labels,
    evaluate,
    load_model,
    warn_if_truncated,
)
from silotune.ml.merge import apply_update, module_shapes
from silotune.ml.targets import resolve_targets
from silotune.planning.sensitivity import model_spec
from silotune.progress import Emit, track
from silotune.protocol import keys as P
from silotune.protocol.messages import TrainReply
from silotune.server import checkpoint, outcome
from silotune.server.client_dp import ClientLevelRun
from silotune.server.exchange import collect, on_wire, restrict, shapes_of, train_message
from silotune.server.fedpipe import configure
from silotune.server.heads import HeadBook, check_chain, shared_book, shared_book_path
from silotune.server.registry import from_environment
from silotune.server.report import write_report
from silotune.server.roster import Roster, exchange
from silotune.server.state import GlobalState
from silotune.strategies.base import SiloPlan

log = logging.getLogger(__name__)
BEST_ADAPTER = "best/adapter.npz"  # the global adapter of the best round (adapter rules)


def run_federation(grid: Grid, cfg: RunConfig, progress: Emit = print) -> dict[str, Any]:
    """Run `cfg.rounds` rounds; write metrics.json, checkpoints and report.html."""
    federation = Federation(grid, cfg, progress)
    first = len(federation.metrics["rounds"]) + 1
    for round_ in track(range(first, cfg.rounds + 1), "rounds", emit=progress):
        federation.run_round(round_)
    federation.finish()
    write_report(federation.out)
    return federation.metrics


class Federation:
    """One federation's coordinator: the global model, the silos and the metrics."""

    def __init__(self, grid: Grid, cfg: RunConfig, progress: Emit) -> None:
        self.grid, self.cfg, self.progress = grid, cfg, progress
        self.rule = strategies.create(cfg.strategy)
        self.out = Path(cfg.out_dir)
        for sub in ("ledgers", "checkpoint"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.model, self.tok = load_model(resolve_model(cfg.model, progress=progress))
        # `auto` targets become the model's names here, so every silo is sent explicit ones
        self.cfg = cfg = replace(cfg, lora_targets=resolve_targets(self.model,
                                                                   cfg.lora_targets))
        progress(f"[model] LoRA on {', '.join(cfg.lora_targets)}")
        self.task = evaluation_split(cfg)
        check_labels_differ(self.tok, self.task.labels)
        self.truncated = warn_if_truncated(self.tok, list(self.task.test["text"]), "held-out")
        self.state = GlobalState()
        self.rng = random.Random(cfg.seed)  # public: fixes which silos are sampled
        resumed = checkpoint.load(self.out / "checkpoint", cfg) if cfg.resume else None
        self._start(resumed)
        self.registry = from_environment()  # pinned ledger keys (and sizes) of enrolment
        self.heads = HeadBook.from_json(resumed.heads if resumed else None)
        last = self.metrics["rounds"][-1] if self.metrics["rounds"] else {}
        self.epsilon: dict[str, float] = dict(last.get("epsilon", {}))  # silos trained so far
        self.limits: dict[str, float] = dict(last.get("epsilon_limit", {}))
        self.sigma: dict[str, float] = dict(last.get("noise_multiplier", {}))
        self.roster = Roster(grid, cfg, ranks=resumed.ranks if resumed else None)
        self.client_dp: ClientLevelRun | None = None
        if cfg.client_dp_noise > 0:  # DP-FedAvg around the rule; its own ledger and epsilon
            self.client_dp = ClientLevelRun(self.rule, cfg, len(self.roster),
                                            self.per_round(), self.out,
                                            str(grid.run.run_id))
            self.rule = self.client_dp.rule
        self.shapes = self._setup_rule()
        progress(f"[silos] {len(self.roster)} connected; each is contacted the first time "
                 "it is sampled")

    def per_round(self) -> int:
        """Silos sampled per round: `fraction_train` of those known, at least
        `min_replies`. Client-level DP keeps the number its accounting was set up with
        (sampling it from more silos only lowers the true sampling rate)."""
        if self.client_dp is not None:
            return self.client_dp.dp.cfg.per_round
        n = len(self.roster)
        return min(n, max(self.cfg.min_replies, round(self.cfg.fraction_train * n)))

    def held_out(self) -> tuple[float, float]:
        """Accuracy and loss of the global model on the held-out split."""
        scored = self.model
        if self.state.adapter is not None:  # the global adapter sits on top of the base
            scored = copy.deepcopy(self.model)
            apply_update(scored, self.state.adapter)
        res = evaluate(scored, self.tok, list(self.task.test["text"]),
                       list(self.task.test["label"]), self.task.labels,
                       self.cfg.eval_batch_size)
        return res.accuracy, res.loss

    def _start(self, resumed: checkpoint.Checkpoint | None) -> None:
        """Evaluate the base model (a new federation) or restore a checkpoint."""
        if resumed is None:
            t0 = time.monotonic()
            base_accuracy, base_loss = self.held_out()
            self.progress(f"[base] held-out accuracy {base_accuracy:.3f}, loss "
                          f"{base_loss:.3f} ({len(self.task.test)} examples, "
                          f"{len(self.task.labels)} labels, {time.monotonic() - t0:.0f} s)")
            self.federation_id = checkpoint.new_federation_id()
            self.metrics: dict[str, Any] = {
                "config": self.cfg.to_json_dict(), "private": self.cfg.private,
                "base_accuracy": base_accuracy, "base_loss": base_loss, "rounds": []}
        else:
            self.state = GlobalState(resumed.arrays, resumed.scales, resumed.fingerprints,
                                     resumed.adapter)
            for update in self.state.updates():  # the global base as of the checkpoint
                apply_update(self.model, update)
            self.rng.setstate(resumed.rng_state)
            self.federation_id, self.metrics = resumed.federation_id, resumed.metrics
            self.progress(f"[resume] {self.federation_id}: rounds 1-{resumed.round} of "
                          f"{self.cfg.rounds} restored from {self.out / 'checkpoint'}")
        self.metrics["federation_id"] = self.federation_id

    def _setup_rule(self) -> dict[str, tuple[int, int]]:
        """FedPipe plans (when profiles are on), then the rule's setup; the adapted
        modules' shapes."""
        cfg, silos, targets = self.cfg, self.roster.silos, self.cfg.lora_targets
        if cfg.profiles:  # FedPipe: targets, rank, batch and base precision per silo
            everyone = self.roster.everyone()
            plan = configure(self.grid, cfg, everyone, model_spec(self.model),
                             self.federation_id, self.progress)
            for s, planned in plan.silos.items():
                everyone[s].plan(planned)
            self.metrics["plan"] = plan.to_json()
            # the run's targets too: a run whose hello got no answer keeps a non-empty set
            targets = tuple(sorted({*cfg.lora_targets,
                                    *(t for v in everyone.values() for t in v.targets)}))
        shapes = module_shapes(self.model, targets)
        ranks = {s: v.rank for s, v in silos.items()} if cfg.profiles else self.roster.ranks()
        self.rule.setup(ranks, shapes, cfg.seed)
        return shapes

    def run_round(self, round_: int) -> None:
        """One round, end to end; appends its row to the metrics and checkpoints."""
        known = len(self.roster)
        self.roster.refresh()
        if len(self.roster) > known:
            self.progress(f"[silos] {len(self.roster) - known} more online; {len(self.roster)} "
                          "in the sampling order from this round on")
        self._share_heads()  # the heads other runs of this coordinator accepted since
        start = time.monotonic()
        silos = self.roster.silos
        sampled, unreachable = self.roster.sample(self.rng, self.per_round())
        plans = {s: on_wire(restrict(self.rule.plan(s, silos[s].rank, self.state.adapter,
                                                    round_),
                                     shapes_of(self.shapes, silos[s].targets)),
                            self.cfg.wire_dtype) for s in sampled}
        replies, bytes_down, lost = self._send(round_, plans)
        heads_before = self.heads
        adapters, excluded, bytes_up, facts = collect(
            self.cfg, self.roster, self.shapes, plans, replies, round_=round_,
            merged=len(self.state.fingerprints), admit=self._admit_head)
        for a_silo, answer in adapters.values():
            silos[a_silo.silo].base_version = answer.base_version
            if answer.epsilon is not None and answer.epsilon_limit is not None:
                self.epsilon[a_silo.silo] = answer.epsilon
                self.limits[a_silo.silo] = answer.epsilon_limit
            if answer.noise_multiplier is not None:
                self.sigma[a_silo.silo] = answer.noise_multiplier
        valid = [adapters[s][0] for s in sorted(adapters)]
        client_level = self._aggregate(round_, valid)
        accuracy, loss = self.held_out()
        row = {"round": round_, "accuracy": accuracy, "loss": loss,
               "epsilon": dict(sorted(self.epsilon.items())),
               "epsilon_limit": dict(sorted(self.limits.items())),
               "noise_multiplier": dict(sorted(self.sigma.items())),
               "bytes_up": bytes_up, "bytes_down": bytes_down,
               "seconds": round(time.monotonic() - start, 3),
               "excluded": unreachable + excluded, **_reply_facts(adapters), **facts,
               "ranks": {s: silos[s].rank for s in sampled}, "history_resent": lost,
               "merged_updates": len(self.state.fingerprints),
               "ledger_heads": {s: {"seq": h.seq, "entry_hash": h.entry_hash}
                                for s, h in sorted(self.heads.heads.items())
                                if heads_before.get(s) != h}}
        if self.client_dp is not None:  # a separate guarantee (unit = silo), never added
            row["client_level"] = client_level
            self.metrics["client_level_dp"] = self.client_dp.summary()
        self._record(round_, row)
        eps_text = f", epsilon max {max(self.epsilon.values()):.3f}" if self.epsilon else ""
        if self.sigma:
            eps_text += f" (noise multiplier {min(self.sigma.values()):.3g}"
            eps_text += f"-{max(self.sigma.values()):.3g})" if len(set(self.sigma.values(
            ))) > 1 else ")"
        self.progress(f"[round {round_}/{self.cfg.rounds}] accuracy {accuracy:.3f}, loss "
                      f"{loss:.3f}{eps_text}, {len(valid)}/{len(sampled)} silos, "
                      f"{row['seconds']:.0f} s"
                      + (f", excluded {row['excluded']}" if row["excluded"] else ""))

    def _send(self, round_: int, plans: dict[str, SiloPlan]
              ) -> tuple[dict[str, Message], int, list[str]]:
        """Send the round's train messages; silos that lost their copy of the history
        are sent all of it, once. The replies, the bytes sent and the silos resent."""
        replies, bytes_down = self._exchange(round_, plans)
        lost = sorted(s for s, r in replies.items()
                      if r.has_error() and r.error.code == P.ERROR_MISSING_ROUNDS)
        if lost:
            log.warning("resending the whole global history to %s: %s", lost,
                        "; ".join(str(replies[s].error.reason) for s in lost))
            for s in lost:
                self.roster.silos[s].base_version = 0
            again, resent = self._exchange(round_, {s: plans[s] for s in lost})
            replies.update(again)
            bytes_down += resent
        return replies, bytes_down, lost

    def _exchange(self, round_: int, plans: dict[str, SiloPlan]
                  ) -> tuple[dict[str, Message], int]:
        messages = {s: train_message(self.cfg, round_, self.roster.silos[s], plan,
                                     self.state, self.federation_id, self.heads.since(s))
                    for s, plan in plans.items()}
        sent = sum(m.content.array_records[P.ARRAYS].count_bytes() for m in messages.values())
        return exchange(self.grid, messages, self.cfg.round_timeout), sent

    def _admit_head(self, silo: str, answer: TrainReply) -> None:
        """Record the silo's new ledger head, or raise `HeadError` (the reply is then
        excluded with its reason) when its ledger does not extend the last one."""
        if answer.epsilon is None and answer.ledger_chain is None:  # a non-private run
            return
        registered = self.registry.get(silo)
        head = check_chain(self.heads.get(silo), answer.ledger_chain or [],
                           answer.ledger_head, answer.ledger_key,
                           registered.ledger_key if registered is not None else None)
        self.heads = self.heads.with_head(silo, head)

    def _share_heads(self) -> None:
        """Merge this run's heads with the coordinator's book for all its runs (none in a
        simulation), so that a rollback between two runs is refused too."""
        path = shared_book_path()
        if path is None:
            return
        with shared_book(path) as book:
            self.heads = self.heads.merged(book[0])
            book[0] = self.heads

    def _aggregate(self, round_: int, valid: list[SiloAdapter]) -> dict[str, Any] | None:
        """Aggregate and merge the valid adapters (the round is skipped below
        `min_replies`); the client-level DP record of the round, if any."""
        if len(valid) < self.cfg.min_replies:
            self.progress(f"[round {round_}] only {len(valid)} valid replies (< min_replies "
                          f"{self.cfg.min_replies}): round skipped, global model unchanged")
            return None
        result = self.rule.aggregate(valid, self.state.adapter)
        if result.merge is not None:
            apply_update(self.model, self.state.add(result.merge, self.cfg.wire_dtype))
        self.state.adapter = result.adapter
        silos = self.roster.silos
        for adapter in valid:
            silos[adapter.silo].rank = self.rule.next_rank(adapter, silos[adapter.silo].rank)
        return self.client_dp.record(round_) if self.client_dp is not None else None

    def _record(self, round_: int, row: dict[str, Any]) -> None:
        """Append `row` to metrics.json and write the round's checkpoint."""
        self.metrics["rounds"].append(row)
        self._keep_best(round_)
        self.metrics["ledger_heads"] = self.heads.to_json()
        atomic_write_json(self.out / "metrics.json", self.metrics)
        self._share_heads()
        state = self.state
        checkpoint.save(self.out / "checkpoint", checkpoint.Checkpoint(
            round=round_, federation_id=self.federation_id, config=self.cfg.to_json_dict(),
            arrays=state.arrays, scales=state.scales, fingerprints=state.fingerprints,
            adapter=state.adapter, rng_state=self.rng.getstate(),
            ranks={s: v.rank for s, v in self.roster.silos.items()}, metrics=self.metrics,
            heads=self.heads.to_json()))


    def _keep_best(self, round_: int) -> None:
        """Track the best round (docs/algorithms.md, "Never worse than the base"); when it
        is this one and the rule carries a global adapter, keep that adapter (the merged
        rounds up to it are in the checkpoint's history)."""
        best = outcome.best_round(self.metrics)
        previous = self.metrics.get("best_round", {})
        if best["round"] == round_ and self.state.adapter is not None:
            atomic_write_npz(self.out / BEST_ADAPTER, update_to_arrays(self.state.adapter, ""))
            best["adapter"] = {"path": BEST_ADAPTER, "scale": self.state.adapter.scale}
        elif previous.get("round") == best["round"] and "adapter" in previous:
            best["adapter"] = previous["adapter"]
        self.metrics["best_round"] = best

    def finish(self) -> None:
        """Say how the run ended: the best round, and loud warnings with their likely
        causes when it ended below its base or fell while the loss fell."""
        test = self.task.test
        facts = outcome.TaskFacts(
            truncated_share=self.truncated,
            colliding_labels=colliding_labels(self.tok, self.task.labels),
            majority_share=float(test["label"].value_counts(normalize=True).max())
            if len(test) else 0.0)
        notes = outcome.warnings(self.metrics, facts)
        best = self.metrics.get("best_round", {"round": 0})
        self.progress(f"[best] round {best['round']}" + (" (the base model)"
                                                         if best["round"] == 0 else ""))
        for note in notes:
            self.progress(f"[WARNING] {note}")
        self.metrics["warnings"] = notes
        atomic_write_json(self.out / "metrics.json", self.metrics)


def _reply_facts(adapters: dict[str, tuple[SiloAdapter, TrainReply]]) -> dict[str, Any]:
    """Per-round facts from the valid replies: who took part, peak memory, workers."""
    return {"participants": sorted(adapters),
            "peak_memory_bytes": {s: a.peak_memory for s, (_, a) in sorted(adapters.items())
                                  if a.peak_memory is not None},
            "workers": {s: a.worker for s, (_, a) in sorted(adapters.items())
                        if a.worker is not None}}


def evaluation_split(cfg: RunConfig) -> HeldOutSplit:
    """The run's held-out split; a dataset that cannot hold out `cfg.test_size` rows
    fails the run (evaluating on fewer rows than asked would be a silent change).

    Raises
    ------
    ConfigError
        The dataset gives fewer held-out rows than ``test-size``.
    """
    split = held_out_split(cfg.dataset, cfg.text_column, cfg.label_column, cfg.test_size,
                           cfg.seed)
    if len(split.test) < cfg.test_size:
        total = len(split.train) + len(split.test)
        raise ConfigError(f"test-size = {cfg.test_size}, but dataset {cfg.dataset!r} ({total} "
                          f"rows) can hold out only {len(split.test)} (at most half of the "
                          "rows, only labels with 2 or more rows); lower test-size to "
                          f"{len(split.test)} or less, or use a larger dataset")
    return split
