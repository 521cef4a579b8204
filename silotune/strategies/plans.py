"""What every rule shares: the default set-up, and where a silo's adapter starts.

A rule plans each silo's start: the rank-r view of the global adapter when there is one,
else the common seeded start (A from the public seed, B = 0) that the silo regenerates.
"""

from __future__ import annotations

from collections.abc import Mapping

from silotune.adapters.starts import seeded_start
from silotune.adapters.types import LoraFactors, LowRankUpdate, SiloAdapter
from silotune.strategies.base import SiloPlan
from silotune.strategies.common import truncate_factors


def global_view(state: LowRankUpdate, rank: int) -> dict[str, LoraFactors]:
    """The first `rank` components of every module of the global adapter."""
    return {m: truncate_factors(f, min(rank, f.rank)) for m, f in state.modules.items()}


def start_plan(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int,
           state: LowRankUpdate | None, frozen: tuple[str, ...] = (),
           upload: tuple[str, ...] = ("A", "B"), local: tuple[str, ...] = ()) -> SiloPlan:
    """Start from the global adapter if there is one, else from the seeded start."""
    if state is not None:
        return SiloPlan(rank=rank, init=global_view(state, rank), frozen=frozen, upload=upload,
                        local=local)
    return SiloPlan(rank=rank, init=seeded_start(shapes, rank, seed).modules, seed=seed,
                    frozen=frozen, upload=upload, local=local)


class Rule:
    """Defaults shared by the rules: fixed ranks, no setup state."""

    name = ""

    def setup(self, ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]],
              seed: int) -> None:
        self.ranks, self.shapes, self.seed = dict(ranks), dict(shapes), seed

    def next_rank(self, adapter: SiloAdapter, rank: int) -> int:
        return rank


class GlobalAdapterRule(Rule):
    """Rules whose silos start from a common seeded adapter, then from the global one."""

    def plan(self, silo: str, rank: int, state: LowRankUpdate | None,
             round_: int) -> SiloPlan:
        return start_plan(self.shapes, rank, self.seed, state)
