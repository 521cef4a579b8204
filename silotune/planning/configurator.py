"""FedPipe's configurator: per silo, which matrices to adapt, at what rank, batch and base
precision, solved exactly under the silo's memory and time limits.

Fang et al., arXiv 2404.06448, second stage (docs/algorithms.md §6). For silo i, over
the grid (non-empty subsets W of the candidate matrix types, adapted in every layer;
ranks R; micro-batches B; base precisions Q), choose the configuration that maximises,
in this order (lexicographically):

1. ``sum_{m in W} I_m * phi(r)`` (importance covered, `resources.rank_utility`);
2. the batch b (under DP-SGD more examples per step, less sampling variance);
3. the base precision (fp32 before bf16: no rounding of the base);
4. less memory (the cheapest of otherwise equal choices);

subject to ``memory_bytes <= 0.9 M_i`` (`MEMORY_HEADROOM`) and ``round_seconds <= T_i``
(`resources`). The grid
is small (127 subsets x ranks x batches x precisions), so the optimum is exact: for each
(W, r, q) only the largest feasible b can be optimal (memory and time grow with b and a
larger b is preferred), which is what `solve` searches; `enumerate_all` checks every
point and the tests hold the two equal. Adding memory or time only enlarges the feasible
set, so the optimum never gets worse (monotone).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

from silotune.ml import precision
from silotune.planning.resources import (
    CANDIDATES,
    Budget,
    Choice,
    ModelSpec,
    memory_bytes,
    rank_utility,
    round_seconds,
)

GB = 1e9
# Plans keep the modelled memory within this share of a silo's limit: the model's worst
# under-estimate on the measured configurations is 5%, and the runtime needs some room.
MEMORY_HEADROOM = 0.9


class InfeasibleProfileError(ValueError):
    """No configuration of the grid fits a silo's memory and time limits."""


@dataclass(frozen=True)
class Grid:
    """The configurations the configurator may choose from."""

    ranks: tuple[int, ...] = (2, 4, 8, 16)
    batches: tuple[int, ...] = (8, 16, 32)
    precisions: tuple[str, ...] = tuple(precision.PRECISIONS)  # preferred first
    candidates: tuple[str, ...] = CANDIDATES

    def subsets(self) -> Iterator[tuple[str, ...]]:
        """Every non-empty subset of the candidate types, in candidate order."""
        for k in range(1, len(self.candidates) + 1):
            yield from itertools.combinations(self.candidates, k)


@dataclass(frozen=True)
class Evaluated:
    """One configuration with its modelled cost and its objective."""

    choice: Choice
    value: float  # sum of importance x phi(r) over the adapted types
    memory_bytes: float
    seconds: float

    def objective(self, grid: Grid) -> tuple[float, int, int, float]:
        return (self.value, self.choice.batch,
                -grid.precisions.index(self.choice.precision), -self.memory_bytes)


@dataclass(frozen=True)
class PlannedSilo:
    """The configurator's answer for one silo, with the reason it stopped there."""

    best: Evaluated
    budget: Budget
    binding: str  # "memory", "time", "memory+time", or "none (largest in the grid)"


def evaluate(spec: ModelSpec, importance: Mapping[str, float], budget: Budget,
             choice: Choice) -> Evaluated:
    """Objective value, memory and time of `choice` for a silo with `budget`."""
    value = sum(importance.get(t, 0.0) for t in choice.targets) * rank_utility(choice.rank)
    return Evaluated(choice, value, memory_bytes(spec, choice, budget.seq_len),
                     round_seconds(spec, choice, budget))


def _fits(e: Evaluated, budget: Budget) -> bool:
    return (e.memory_bytes <= MEMORY_HEADROOM * budget.memory_bytes
            and e.seconds <= budget.round_seconds)


def enumerate_all(spec: ModelSpec, importance: Mapping[str, float], budget: Budget,
                  grid: Grid) -> Evaluated | None:
    """Reference optimum by checking every point of the grid (None: nothing fits)."""
    best: Evaluated | None = None
    for targets in grid.subsets():
        for rank, batch, prec in itertools.product(grid.ranks, grid.batches,
                                                   grid.precisions):
            e = evaluate(spec, importance, budget, Choice(targets, rank, batch, prec))
            if _fits(e, budget) and (best is None or e.objective(grid) > best.objective(grid)):
                best = e
    return best


def solve(spec: ModelSpec, importance: Mapping[str, float], budget: Budget,
          grid: Grid) -> Evaluated | None:
    """The exact optimum: for each (targets, rank, precision) the largest feasible batch."""
    best: Evaluated | None = None
    batches = sorted(grid.batches, reverse=True)
    for targets in grid.subsets():
        for rank, prec in itertools.product(grid.ranks, grid.precisions):
            for batch in batches:  # memory and time grow with the batch: first fit wins
                e = evaluate(spec, importance, budget, Choice(targets, rank, batch, prec))
                if _fits(e, budget):
                    if best is None or e.objective(grid) > best.objective(grid):
                        best = e
                    break
    return best


def plan_silo(silo: str, spec: ModelSpec, importance: Mapping[str, float], budget: Budget,
              grid: Grid | None = None) -> PlannedSilo:
    """Solve one silo and name its binding constraint; raise `InfeasibleProfileError`
    naming the violated constraint when nothing fits."""
    grid = grid or Grid()
    best = solve(spec, importance, budget, grid)
    if best is None:
        raise InfeasibleProfileError(_why_infeasible(silo, spec, importance, budget, grid))
    better: list[str] = []
    for name, relaxed in (("memory", replace(budget, memory_bytes=math.inf)),
                          ("time", replace(budget, round_seconds=math.inf))):
        alt = solve(spec, importance, relaxed, grid)
        if alt is not None and alt.objective(grid) > best.objective(grid):
            better.append(name)
    if not better:
        both = replace(budget, memory_bytes=math.inf, round_seconds=math.inf)
        alt = solve(spec, importance, both, grid)
        jointly = alt is not None and alt.objective(grid) > best.objective(grid)
        binding = "memory+time" if jointly else "none (largest in the grid)"
    else:
        binding = "+".join(better)
    return PlannedSilo(best=best, budget=budget, binding=binding)


def _why_infeasible(silo: str, spec: ModelSpec, importance: Mapping[str, float],
                    budget: Budget, grid: Grid) -> str:
    points = [evaluate(spec, importance, budget, Choice(t, r, b, q))
              for t in grid.subsets()
              for r, b, q in itertools.product(grid.ranks, grid.batches, grid.precisions)]
    least_mem = min(points, key=lambda e: e.memory_bytes)
    least_time = min(points, key=lambda e: e.seconds)
    problems = []
    if least_mem.memory_bytes > MEMORY_HEADROOM * budget.memory_bytes:
        problems.append(f"memory: the smallest configuration ({describe(least_mem.choice)}) "
                        f"needs {least_mem.memory_bytes / GB:.2f} GB > "
                        f"{MEMORY_HEADROOM:.0%} of the limit {budget.memory_bytes / GB:.2f} "
                        "GB (memory-gb)")
    if least_time.seconds > budget.round_seconds:
        problems.append(f"time: the fastest configuration ({describe(least_time.choice)}) "
                        f"needs {least_time.seconds:.0f} s per round > the limit "
                        f"{budget.round_seconds:.0f} s (round-seconds)")
    if not problems:
        problems.append("memory and time together: every configuration that fits the "
                        "memory limit exceeds the time limit (memory-gb, round-seconds)")
    return (f"silo {silo}: no configuration fits its profile; " + "; ".join(problems)
            + ". Raise the silo's limits, lower local steps, or use a smaller model.")


def describe(choice: Choice) -> str:
    """A short text of a choice, e.g. 'q_proj+v_proj, rank 8, batch 32, fp32'."""
    return (f"{'+'.join(choice.targets)}, rank {choice.rank}, batch {choice.batch}, "
            f"{choice.precision}")


def weakest_budget(budgets: Mapping[str, Budget]) -> Budget:
    """The element-wise minimum of the silos' budgets (what fits it fits every silo)."""
    values = list(budgets.values())
    return Budget(memory_bytes=min(b.memory_bytes for b in values),
                  flops_per_second=min(b.flops_per_second for b in values),
                  upload_bytes_per_second=min(b.upload_bytes_per_second for b in values),
                  download_bytes_per_second=min(b.download_bytes_per_second for b in values),
                  round_seconds=min(b.round_seconds for b in values),
                  local_steps=max(b.local_steps for b in values),
                  seq_len=max(b.seq_len for b in values))


def plan_federation(spec: ModelSpec, importance: Mapping[str, float],
                    budgets: Mapping[str, Budget], mode: str = "per-silo",
                    grid: Grid | None = None) -> dict[str, PlannedSilo]:
    """Plan every silo: its own optimum ("per-silo"), or one configuration for all that
    fits the element-wise weakest budget ("uniform", the baseline FedPipe improves on)."""
    if not budgets:
        raise ValueError("no silos to plan")
    if mode == "uniform":
        weakest = weakest_budget(budgets)
        shared = plan_silo("weakest (uniform plan)", spec, importance, weakest, grid)
        return {s: replace(shared, budget=b) for s, b in sorted(budgets.items())}
    if mode != "per-silo":
        raise ValueError(f"unknown plan mode '{mode}'; valid: per-silo, uniform")
    return {s: plan_silo(s, spec, importance, b, grid) for s, b in sorted(budgets.items())}


def format_plan(plans: Mapping[str, PlannedSilo], importance: Mapping[str, float],
                profiles: Mapping[str, str] | None = None) -> str:
    """The plan as a table: per silo its choice, modelled cost against its limits, and
    the binding constraint; then the importance of each matrix type."""
    head = (f"{'silo':<12} {'profile':<18} {'targets':<44} {'rank':>4} {'batch':>5} "
            f"{'base':>4} {'memory GB (limit)':>18} {'s/round (limit)':>16}  binding")
    lines = [head, "-" * len(head)]
    for silo, p in plans.items():
        c = p.best.choice
        lines.append(
            f"{silo:<12} {(profiles or {}).get(silo, ''):<18} {'+'.join(c.targets):<44} "
            f"{c.rank:>4} {c.batch:>5} {c.precision:>4} "
            f"{p.best.memory_bytes / GB:>7.2f} ({p.budget.memory_bytes / GB:>6.2f})"
            f"   {p.best.seconds:>6.0f} ({p.budget.round_seconds:>6.0f})  {p.binding}")
    total = sum(importance.values()) or 1.0
    lines.append("importance (share): " + ", ".join(
        f"{t} {v / total:.3f}" for t, v in sorted(importance.items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)
