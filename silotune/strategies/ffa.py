"""FFA-LoRA: a frozen shared random A, only B trained and averaged (exact).

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024
(arXiv 2403.12313); docs/algorithms.md §3, §10 #6. Every silo starts from the same
non-zero A_0 drawn from a shared seed and keeps it frozen; B (zero init) is the only
trained and transmitted factor. With p_k = n_k / sum_j n_j and s_k folded into B::

    B_g = sum_k p_k s_k [B_k | 0]    (d_out, r_max)
    B_g @ A_0 = sum_k p_k s_k B_k A_0[:r_k]    exactly (A_0 is shared)

Heterogeneous ranks share A through prefix consistency: the rank-r frozen A is the first
r rows of the rank-r_max one (`frozen_a`), so zero-padding B is exact here. Under DP-SGD
the noise enters only through B (xi_B A_0, linear in the noise).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from silotune.adapters.types import AdapterError, LoraFactors, LowRankUpdate, SiloAdapter
from silotune.strategies.base import RoundResult, SiloPlan, example_weights
from silotune.strategies.common import holders_of, module_names, module_shapes
from silotune.strategies.plans import Rule, start_plan
from silotune.strategies.registry import register


def ffa_average(adapters: Sequence[SiloAdapter]) -> dict[str, LoraFactors]:
    """Average s_k B_k (zero-padded to the largest rank) over a shared frozen A.

    Parameters
    ----------
    adapters : sequence of SiloAdapter
        The participating silos' adapters. A module trained by only some silos is averaged
        over exactly those, with p_k renormalised over that subset.

    Returns
    -------
    dict of str to LoraFactors
        Per module, A = a copy of the largest-rank silo's A (r_max, d_in), dtype kept, and
        B (d_out, r_max) in float64; scale 1.

    Raises
    ------
    AdapterError
        Malformed or mismatched shapes, or two silos' A differ on their common rows
        (A must stay frozen; the comparison is exact).
    """
    out: dict[str, LoraFactors] = {}
    for module in module_names(adapters, "FFA-LoRA"):
        holders = holders_of(adapters, module)
        d_out, _ = module_shapes(module, holders)
        ref = max(holders, key=lambda a: a.modules[module].rank)
        a_ref = ref.modules[module].A  # (r_max, d_in)
        for a in holders:
            a_k = a.modules[module].A  # (r_k, d_in)
            if not np.array_equal(a_k, a_ref[: a_k.shape[0], :]):
                raise AdapterError(
                    f"module '{module}': silo '{a.silo}' and silo '{ref.silo}' disagree on A; "
                    "A must stay frozen at the shared seeded init in FFA-LoRA"
                )
        b_avg = np.zeros((d_out, a_ref.shape[0]))  # (d_out, r_max)
        for p_k, a in zip(example_weights(holders), holders, strict=True):
            f = a.modules[module]
            b_avg[:, : f.rank] += (p_k * a.scale) * f.B.astype(np.float64)  # (d_out, r_k)
        out[module] = LoraFactors(A=a_ref.copy(), B=b_avg)
    return out


@register
class FFALoRA(Rule):
    """FFA-LoRA (Sun et al., ICLR 2024): A frozen from the shared seed; only B trains."""

    name = "ffa"

    def plan(self, silo: str, rank: int, state: LowRankUpdate | None,
             round_: int) -> SiloPlan:
        return start_plan(self.shapes, rank, self.seed, state, frozen=("A",), upload=("B",))

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        return RoundResult(adapter=LowRankUpdate(ffa_average(adapters)))
