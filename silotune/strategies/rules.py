"""The registered aggregation rules: each plans the silos' adapters and aggregates them.

Thin wrappers over the pure functions of the sibling modules (one per paper), in the shape
the round loop expects (`AggregationRule` in base.py). Two families:

- FLoRA merges each round's exact stacked update into the base; silos start every round
  from a fresh LoRA (docs/algorithms.md §2.2).
- FedIT, zero-padding, HetLoRA, FlexLoRA, FFA-LoRA and FedSA-LoRA carry a global adapter
  across rounds; each silo starts from its rank-r_k view of it (§3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from silotune.adapters.starts import seeded_start
from silotune.adapters.types import AdapterError, LoraFactors, LowRankUpdate, SiloAdapter
from silotune.strategies.base import RoundResult, SiloPlan
from silotune.strategies.common import truncate_factors
from silotune.strategies.fedit import fedit_average
from silotune.strategies.fedsa import fedsa_average
from silotune.strategies.ffa import ffa_average
from silotune.strategies.flexlora import factored_svd
from silotune.strategies.flora import flora_stack
from silotune.strategies.hetlora import hetlora_aggregate, hetlora_prune_rank
from silotune.strategies.zeropad import zeropad_average


def _view(state: LowRankUpdate, rank: int) -> dict[str, LoraFactors]:
    """The first `rank` components of every module of the global adapter."""
    return {m: truncate_factors(f, min(rank, f.rank)) for m, f in state.modules.items()}


def _start(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int,
           state: LowRankUpdate | None, frozen: tuple[str, ...] = (),
           upload: tuple[str, ...] = ("A", "B"), local: tuple[str, ...] = ()) -> SiloPlan:
    """Start from the global adapter if there is one, else from the seeded start."""
    if state is not None:
        return SiloPlan(rank=rank, init=_view(state, rank), frozen=frozen, upload=upload,
                        local=local)
    return SiloPlan(rank=rank, init=seeded_start(shapes, rank, seed).modules, seed=seed,
                    frozen=frozen, upload=upload, local=local)


class _Rule:
    """Defaults shared by the rules: fixed ranks, no setup state."""

    name = ""

    def setup(self, ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]],
              seed: int) -> None:
        self.ranks, self.shapes, self.seed = dict(ranks), dict(shapes), seed

    def next_rank(self, adapter: SiloAdapter, rank: int) -> int:
        return rank


class FLoRA(_Rule):
    """FLoRA stacking (Wang et al., NeurIPS 2024): exact for any mix of ranks."""

    name = "flora"

    def plan(self, silo: str, rank: int, state: LowRankUpdate | None,
             round_: int) -> SiloPlan:
        # A fresh adapter every round (A seeded per round, B = 0). Seeding it here rather
        # than in PEFT lets the coordinator know each silo's start (upload compression
        # sends the change from it); stacking stays exact whatever the A's are.
        return _start(self.shapes, rank, self.seed * 1_000_003 + round_, None)

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        return RoundResult(merge=flora_stack(adapters))


class _GlobalAdapterRule(_Rule):
    """Rules whose silos start from a common seeded adapter, then from the global one."""

    def plan(self, silo: str, rank: int, state: LowRankUpdate | None,
             round_: int) -> SiloPlan:
        return _start(self.shapes, rank, self.seed, state)


class FedIT(_GlobalAdapterRule):
    """FedIT (Zhang et al., ICASSP 2024): average A and B separately; equal ranks only."""

    name = "fedit"

    def setup(self, ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]],
              seed: int) -> None:
        if len(set(ranks.values())) > 1:
            raise AdapterError(f"fedit needs one rank for every silo, got "
                               f"{sorted(set(ranks.values()))}; pass e.g. --ranks 8, or use "
                               "--strategy flora or zeropad for mixed ranks")
        super().setup(ranks, shapes, seed)

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        return RoundResult(adapter=LowRankUpdate(fedit_average(adapters)))


class ZeroPad(_GlobalAdapterRule):
    """Zero-padding: pad to the largest rank, average, silos take their truncation."""

    name = "zeropad"

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        return RoundResult(adapter=LowRankUpdate(zeropad_average(adapters)))


class HetLoRA(_GlobalAdapterRule):
    """HetLoRA (Cho et al., EMNLP 2024): update-norm-weighted zero-padding, rank pruning.

    A silo's rank shrinks to floor(gamma r) once the summed tail norm of its uploaded
    factors falls below the previous round's (the pruning decision is taken here, from
    the upload, so silos need no extra state).
    """

    name = "hetlora"

    def __init__(self, gamma: float = 0.99) -> None:
        self.gamma = gamma
        self.tails: dict[str, float] = {}

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        return RoundResult(adapter=LowRankUpdate(hetlora_aggregate(adapters)))

    def next_rank(self, adapter: SiloAdapter, rank: int) -> int:
        decisions = [hetlora_prune_rank(f, rank, self.gamma, None)
                     for f in adapter.modules.values()]
        tail = float(sum(t for _, t in decisions))
        previous = self.tails.get(adapter.silo)
        self.tails[adapter.silo] = tail
        if previous is not None and tail < previous:
            return max(1, int(self.gamma * rank))
        return rank


class FlexLoRA(_Rule):
    """FlexLoRA (Bai et al., NeurIPS 2024): sum the full-size updates, redistribute by SVD."""

    name = "flexlora"

    def plan(self, silo: str, rank: int, state: LowRankUpdate | None,
             round_: int) -> SiloPlan:
        return _start(self.shapes, rank, self.seed, state)  # seeded: B = 0, Delta W = 0

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        # sum_k p_k s_k B_k A_k in exact factored form (the FLoRA stack), then its SVD
        # truncated to the largest rank any silo takes back.
        keep = max(self.ranks.values())
        stacked = flora_stack(adapters).modules
        return RoundResult(adapter=LowRankUpdate(
            {name: factored_svd(f, keep) for name, f in stacked.items()}))


class FFALoRA(_Rule):
    """FFA-LoRA (Sun et al., ICLR 2024): A frozen from the shared seed; only B trains."""

    name = "ffa"

    def plan(self, silo: str, rank: int, state: LowRankUpdate | None,
             round_: int) -> SiloPlan:
        return _start(self.shapes, rank, self.seed, state, frozen=("A",), upload=("B",))

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        return RoundResult(adapter=LowRankUpdate(ffa_average(adapters)))


class FedSALoRA(_GlobalAdapterRule):
    """FedSA-LoRA (Guo et al., ICLR 2025): only A is aggregated; each silo keeps its B.

    Silos also upload B, only so that the coordinator can evaluate a global model
    (base + mean B @ mean A) on the held-out split; B never flows back to any silo.
    """

    name = "fedsa"

    def setup(self, ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]],
              seed: int) -> None:
        if len(set(ranks.values())) > 1:
            raise AdapterError("fedsa averages A across silos and needs one rank for every "
                               f"silo, got {sorted(set(ranks.values()))}; pass e.g. --ranks 8")
        super().setup(ranks, shapes, seed)

    def plan(self, silo: str, rank: int, state: LowRankUpdate | None,
             round_: int) -> SiloPlan:
        return _start(self.shapes, rank, self.seed, state, local=("B",))

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        shared_a = fedsa_average(adapters)
        mean_b = {m: f.B for m, f in fedit_average(adapters).items()}  # evaluation only
        return RoundResult(adapter=LowRankUpdate(
            {m: LoraFactors(A=a, B=mean_b[m]) for m, a in shared_a.items()}))
