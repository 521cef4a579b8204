"""FedSA-LoRA: share and average A only; every silo keeps its own B.

Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning",
ICLR 2025; reference configs ``Pengxin-Guo/FedSA-LoRA``
(``personalization.local_param: ['lora_B', 'classifier']``); docs/algorithms.md §3, §4.
For every adapted module, with p_k = n_k / sum_j n_j::

    A_g = sum_k p_k A_k      (r, d_in)    equal ranks required
    silo k's model: W_0 + s_k B_k A_g     (B_k and s_k stay with the silo)

Personalised by design, so there is no single global dense update. A is averaged without
the silo scales, which stay with the local B. The rule never reads B values (B may even
be a placeholder of the right shape); upload and download are r d_in per module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from silotune.adapters.types import AdapterError, LoraFactors, LowRankUpdate, SiloAdapter
from silotune.strategies.base import RoundResult, SiloPlan, example_weights
from silotune.strategies.common import holders_of, module_names, module_shapes
from silotune.strategies.fedit import fedit_average
from silotune.strategies.plans import GlobalAdapterRule, start_plan
from silotune.strategies.registry import register


def fedsa_average(adapters: Sequence[SiloAdapter]) -> dict[str, np.ndarray]:
    """The shared A of every module: sum_k p_k A_k (float64); B is left to the silos.

    Parameters
    ----------
    adapters : sequence of SiloAdapter
        The participating silos' adapters. A module trained by only some silos is averaged
        over exactly those, with p_k renormalised over that subset. B is used for shape
        checks only.

    Returns
    -------
    dict of str to ndarray of shape (r, d_in)

    Raises
    ------
    AdapterError
        Malformed or mismatched shapes, or unequal ranks within a module.
    """
    out: dict[str, np.ndarray] = {}
    for module in module_names(adapters, "FedSA-LoRA"):
        holders = holders_of(adapters, module)
        _, d_in = module_shapes(module, holders, check_b_values=False)
        ranks = [a.modules[module].rank for a in holders]
        if len(set(ranks)) > 1:
            raise AdapterError(
                f"module '{module}': FedSA-LoRA averages A and needs equal ranks, but the "
                f"silos have {ranks}"
            )
        a_avg = np.zeros((ranks[0], d_in))  # (r, d_in)
        for p_k, a in zip(example_weights(holders), holders, strict=True):
            a_avg += p_k * a.modules[module].A.astype(np.float64)  # (r, d_in)
        out[module] = a_avg
    return out


@register
class FedSALoRA(GlobalAdapterRule):
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
        return start_plan(self.shapes, rank, self.seed, state, local=("B",))

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        shared_a = fedsa_average(adapters)
        mean_b = {m: f.B for m, f in fedit_average(adapters).items()}  # evaluation only
        return RoundResult(adapter=LowRankUpdate(
            {m: LoraFactors(A=a, B=mean_b[m]) for m, a in shared_a.items()}))
