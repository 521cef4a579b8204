"""The aggregation-rule interface: what a rule plans for a silo and what it returns.

Pure NumPy; no Flower import. Each rule module registers itself (`strategies.register`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from silotune.adapters.types import AdapterError, LoraFactors, LowRankUpdate, SiloAdapter


@dataclass(frozen=True)
class SiloPlan:
    """What one silo trains in a round, as decided by the aggregation rule.

    `init` holds starting factors in the scale-1 convention (``Delta W = B @ A``; the silo
    divides B by its own scale s_k); None means a fresh PEFT init (A Kaiming, B = 0).
    """

    rank: int
    init: Mapping[str, LoraFactors] | None = None
    # When set, `init` is `seeded_start(shapes, rank, seed)` (A from the seed, B = 0):
    # the silo regenerates it instead of downloading it.
    seed: int | None = None
    frozen: tuple[str, ...] = ()  # factors that must not train ("A" for FFA-LoRA)
    upload: tuple[str, ...] = ("A", "B")  # factors the silo sends back
    local: tuple[str, ...] = ()  # factors the silo starts from its own last value (FedSA)


@dataclass(frozen=True)
class RoundResult:
    """A rule's output: an update merged into the base for good (FLoRA) and/or the
    global adapter carried on top of the base into the next round (FedIT family)."""

    merge: LowRankUpdate | None = None
    adapter: LowRankUpdate | None = None


class AggregationRule(Protocol):
    """An aggregation rule: plans each silo's adapter and aggregates the replies.

    Pure: no Flower types. `setup` is called once with every silo's rank and the adapted
    modules' shapes; `state` is the global adapter of the previous round (or None).
    """

    name: str

    def setup(self, ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]],
              seed: int) -> None: ...

    def plan(self, silo: str, rank: int, state: LowRankUpdate | None,
             round_: int) -> SiloPlan: ...

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult: ...

    def next_rank(self, adapter: SiloAdapter, rank: int) -> int: ...


def example_weights(adapters: Sequence[SiloAdapter]) -> np.ndarray:
    """p_k = n_k / sum_j n_j over the participating silos (FLoRA, FedAvg)."""
    counts = np.array([a.num_examples for a in adapters], dtype=np.float64)
    if counts.size == 0 or np.any(counts <= 0):
        raise AdapterError("every participating silo needs a positive example count")
    return counts / counts.sum()
