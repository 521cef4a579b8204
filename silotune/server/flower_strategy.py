"""A thin Flower strategy over silotune's aggregation rules, for users of Flower's own loop.

silotune's coordinator runs its own round loop (server/loop.py) because it needs per-silo
plans and replay of the merged history; a Flower app that drives `Strategy.start` itself
can still aggregate heterogeneous LoRA replies exactly with this adapter: `FedAvg`'s
sampling and messaging, with `aggregate_train` replaced by validation plus a registered
rule (FLoRA stacking by default; Wang et al., arXiv 2409.05976). Replies are PEFT
state dicts (``...lora_A.weight`` / ``...lora_B.weight``) under ``arrays`` with
``num-examples`` in their metrics, which is also what silotune's silos send.

The returned ArrayRecord holds the round's global update ``scale * B @ A`` per module as
``<module>.lora_{A,B[,w]}`` (see `adapters.codec.update_to_arrays`) plus ``scale`` as a
1-element array, all fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from silotune import strategies
from silotune.adapters.codec import update_to_arrays
from silotune.adapters.types import AdapterError, LowRankUpdate, SiloAdapter, modules_from_peft
from silotune.protocol import keys as P
from silotune.protocol.codec import from_record, to_record
from silotune.server.validate import Expected, validate_reply

log = logging.getLogger(__name__)
SCALE_KEY = "scale"


class LoraRuleStrategy(FedAvg):
    """`FedAvg` whose training aggregation is a silotune rule over validated LoRA replies.

    Parameters
    ----------
    shapes : Mapping[str, tuple[int, int]]
        Adapted module -> (d_out, d_in) of its frozen weight (`merge.module_shapes`).
    rule : str
        Registered rule name (`silotune.strategies.available()`).
    alpha_per_rank : float
        LoRA alpha / r used by every silo (scale s_k of its forward pass).
    max_update_norm : float
        Replies whose ||s B A||_F exceeds this are excluded.
    seed : int
        Public seed handed to the rule's `setup` (seeded starts of FFA-LoRA and others).
    **fedavg : Any
        Passed to `FedAvg` (fractions, minimum node counts, ...).

    Attributes
    ----------
    excluded : list of dict
        ``{"round", "node", "reason"}`` for every reply left out, across rounds.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], rule: str = "flora",
                 alpha_per_rank: float = 2.0, max_update_norm: float = float("inf"),
                 seed: int = 0, **fedavg: object) -> None:
        super().__init__(weighted_by_key=P.NUM_EXAMPLES, arrayrecord_key=P.ARRAYS,
                         **fedavg)  # type: ignore[arg-type]
        self.rule = strategies.create(rule)
        self.shapes = dict(shapes)
        self.alpha_per_rank = alpha_per_rank
        self.max_update_norm = max_update_norm
        self.seed = seed
        self.state: LowRankUpdate | None = None
        self.excluded: list[dict[str, object]] = []

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, aggregate the valid ones with the rule, return the update."""
        answered, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        adapters: list[SiloAdapter] = []
        kept: list[Message] = []
        for msg in answered:
            node = f"node-{msg.metadata.src_node_id}"
            try:
                adapters.append(self._adapter(node, msg))
                kept.append(msg)
            except (AdapterError, KeyError, ValueError) as err:
                self.excluded.append({"round": server_round, "node": node, "reason": str(err)})
                log.warning("round %d excluded %s: %s", server_round, node, err)
        if not adapters:
            return None, None
        self.rule.setup({a.silo: _rank(a) for a in adapters}, self.shapes, self.seed)
        result = self.rule.aggregate(adapters, self.state)
        self.state = result.adapter
        update = result.merge if result.merge is not None else result.adapter
        if update is None:
            return None, None
        arrays = update_to_arrays(update, "")
        arrays[SCALE_KEY] = np.asarray([update.scale])
        metrics = self.train_metrics_aggr_fn([m.content for m in kept], self.weighted_by_key)
        return to_record(arrays, "fp32"), metrics

    def _adapter(self, node: str, msg: Message) -> SiloAdapter:
        arrays = {k: v.astype(np.float32) for k, v in
                  from_record(msg.content.array_records[self.arrayrecord_key]).items()}
        ranks = {f.rank for f in modules_from_peft(arrays).values()}
        if len(ranks) != 1:
            raise AdapterError(f"modules of one reply have different ranks {sorted(ranks)}")
        rank = ranks.pop()
        expected = Expected(rank=rank, scale=self.alpha_per_rank, shapes=self.shapes,
                            max_norm=self.max_update_norm)
        num_examples = msg.content.metric_records[P.METRICS][self.weighted_by_key]
        return validate_reply(node, arrays, num_examples, expected)


def _rank(adapter: SiloAdapter) -> int:
    return next(iter(adapter.modules.values())).rank
