"""FLoRA: exact aggregation of heterogeneous-rank LoRA adapters by stacking.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024 (arXiv 2409.05976); reference code
``ATP-1010/FederatedLLM``, ``fed_utils/model_aggregation.py`` (``stacking=True``).

For every adapted module, with p_k = n_k / sum_j n_j and the silo's scale s_k::

    A_g = [p_1 s_1 A_1; ...; p_K s_K A_K]   (R, d_in)    R = sum_k r_k
    B_g = [B_1 | ... | B_K]                 (d_out, R)
    B_g @ A_g = sum_k p_k s_k B_k A_k       exactly: no cross terms

p_k multiplies A only (weighting both factors would give p_k^2). The weights p_k s_k are
kept as one weight per stacked component (``LoraFactors.w``) instead of being multiplied
into A: stacking is then pure copying (fast, and the factors stay exactly as sent). The
stacked rank R is computed from the tensors, never assumed (the public code's hard-coded
R breaks with partial participation). Silos are stacked in the order given; callers pass them sorted
by silo id so that a run is reproducible.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from silotune.adapters.types import AdapterError, LoraFactors, LowRankUpdate, SiloAdapter
from silotune.strategies.base import RoundResult, SiloPlan, example_weights
from silotune.strategies.plans import Rule, start_plan
from silotune.strategies.registry import register


def flora_stack(adapters: Sequence[SiloAdapter]) -> LowRankUpdate:
    """Stack silo adapters into one exact global update (scale 1).

    Modules trained by only some silos are stacked over exactly those silos, with p_k
    renormalised over that subset. Inputs are not mutated.
    """
    if not adapters:
        raise AdapterError("FLoRA needs at least one adapter")
    modules = sorted({m for a in adapters for m in a.modules})
    # Modules are independent and the copies release the GIL: stack them in parallel.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        stacked = dict(zip(modules, pool.map(lambda m: _stack_module(adapters, m), modules),
                           strict=True))
    return LowRankUpdate(modules=stacked, scale=1.0)


def _stack_module(adapters: Sequence[SiloAdapter], module: str) -> LoraFactors:
    """A_g = [A_k]_k (R, d_in), B_g = [B_k]_k (d_out, R), w = [p_k s_k repeated r_k]_k."""
    holders = [a for a in adapters if module in a.modules]
    p = example_weights(holders)
    factors = [a.modules[module] for a in holders]
    dtype = np.result_type(*(f.A.dtype for f in factors), *(f.B.dtype for f in factors))
    a_g = np.concatenate([f.A for f in factors], axis=0, dtype=dtype)  # (R, d_in)
    b_g = np.concatenate([f.B for f in factors], axis=1, dtype=dtype)  # (d_out, R)
    w = np.concatenate([np.full(f.rank, p_k * h.scale)  # p_k on A's side only
                        for p_k, h, f in zip(p, holders, factors, strict=True)])  # (R,)
    return LoraFactors(A=a_g, B=b_g, w=w)


@register
class FLoRA(Rule):
    """FLoRA stacking (Wang et al., NeurIPS 2024): exact for any mix of ranks."""

    name = "flora"

    def plan(self, silo: str, rank: int, state: LowRankUpdate | None,
             round_: int) -> SiloPlan:
        # A fresh adapter every round (A seeded per round, B = 0). Seeding it here rather
        # than in PEFT lets the coordinator know each silo's start (upload compression
        # sends the change from it); stacking stays exact whatever the A's are.
        return start_plan(self.shapes, rank, self.seed * 1_000_003 + round_, None)

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        return RoundResult(merge=flora_stack(adapters))
