"""FedIT: federated instruction tuning by averaging the LoRA factors separately.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024; reference code ``JayZhang42/FederatedGPT-Shepherd``,
``fed_utils/model_aggregation.py`` (docs/algorithms.md §3). Not the FLoRA repository's
FedIT, whose accumulation typo keeps only the first client (§5.1).

For every adapted module, with p_k = n_k / sum_j n_j and the silo's scale s_k folded
into B (so mixed alpha is handled; the result has scale 1)::

    A_g = sum_k p_k A_k          (r, d_in)
    B_g = sum_k p_k s_k B_k      (d_out, r)

``B_g @ A_g`` differs from the ideal sum_k p_k s_k B_k A_k by (§2.3, with s folded)
sum_{i != j} p_i p_j B_i A_j - sum_k p_k (1 - p_k) B_k A_k; from a common start this is
minus the p-weighted covariance of the local deltas, so it vanishes when every delta A is
zero (one SGD step from B = 0). Ranks must agree per module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from silotune.adapters.types import AdapterError, LoraFactors, LowRankUpdate, SiloAdapter
from silotune.strategies.base import RoundResult, example_weights
from silotune.strategies.common import holders_of, module_names, weighted_padded_average
from silotune.strategies.plans import GlobalAdapterRule
from silotune.strategies.registry import register


def fedit_average(adapters: Sequence[SiloAdapter]) -> dict[str, LoraFactors]:
    """Average A and s_k B separately per module (FedIT; inexact, see §2.3).

    Parameters
    ----------
    adapters : sequence of SiloAdapter
        The participating silos' adapters. A module trained by only some silos is averaged
        over exactly those, with p_k renormalised over that subset.

    Returns
    -------
    dict of str to LoraFactors
        Per module, A (r, d_in) and B (d_out, r), float64, scale 1.

    Raises
    ------
    AdapterError
        No adapters, malformed or mismatched shapes, or unequal ranks within a module.
    """
    out: dict[str, LoraFactors] = {}
    for module in module_names(adapters, "FedIT"):
        holders = holders_of(adapters, module)
        ranks = [a.modules[module].rank for a in holders]
        if len(set(ranks)) > 1:
            raise AdapterError(
                f"module '{module}': FedIT needs equal ranks but the silos have {ranks}; "
                "use the 'zeropad' or the exact 'flora' rule for heterogeneous ranks"
            )
        out[module] = weighted_padded_average(module, holders, example_weights(holders))
    return out


@register
class FedIT(GlobalAdapterRule):
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
