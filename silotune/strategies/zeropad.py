"""Zero-padding FedAvg of heterogeneous-rank LoRA factors, and the shared padding helpers.

Project baseline (docs/algorithms.md §3, "Zero-padding"; FedIT after padding, and the
aggregation step of HetLoRA, Cho et al., EMNLP 2024, arXiv 2401.06432). For every adapted
module, pad A_k with r_max - r_k zero rows and B_k with zero columns, then average with
weights w_k (default p_k = n_k / sum_j n_j), folding the silo's scale s_k into B::

    A_g = sum_k w_k [A_k; 0]         (r_max, d_in)
    B_g = sum_k w_k s_k [B_k | 0]    (d_out, r_max)

Silo k then receives the truncation ``B_g[:, :r_k]``, ``A_g[:r_k, :]``. The result has
scale 1. Not exact with heterogeneous ranks (§10 #7: 69% relative error on the toy); with
equal ranks it is FedIT. The helpers here (module listing, shape checks, padded weighted
average) are shared by the FedIT, HetLoRA, FlexLoRA, FFA-LoRA and FedSA-LoRA modules.
Results are float64 (except where a rule returns a silo's frozen factor); inputs are never
mutated and no output aliases an input array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from silotune.adapters.types import AdapterError, LoraFactors, LowRankUpdate, SiloAdapter
from silotune.strategies.base import RoundResult, example_weights
from silotune.strategies.common import module_names, weighted_padded_average
from silotune.strategies.plans import GlobalAdapterRule
from silotune.strategies.registry import register


def zeropad_average(
    adapters: Sequence[SiloAdapter], weights: np.ndarray | None = None
) -> dict[str, LoraFactors]:
    """Zero-pad every module to its largest rank present and average (scale 1).

    Parameters
    ----------
    adapters : sequence of SiloAdapter
        The participating silos' adapters.
    weights : ndarray of shape (len(adapters),), optional
        Non-negative per-silo weights; default p_k = n_k / sum_j n_j. For a module trained
        by only some silos the weights are renormalised over exactly those.

    Returns
    -------
    dict of str to LoraFactors
        Per module, A (r_max, d_in) and B (d_out, r_max) with s_k folded into B.
    """
    names = module_names(adapters, "zero-padding")
    w = example_weights(adapters) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(adapters),):
        raise AdapterError(f"need {len(adapters)} weights, one per adapter, got shape {w.shape}")
    out: dict[str, LoraFactors] = {}
    for module in names:
        idx = [k for k, a in enumerate(adapters) if module in a.modules]
        out[module] = weighted_padded_average(module, [adapters[k] for k in idx], w[idx])
    return out


@register
class ZeroPad(GlobalAdapterRule):
    """Zero-padding: pad to the largest rank, average, silos take their truncation."""

    name = "zeropad"

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        return RoundResult(adapter=LowRankUpdate(zeropad_average(adapters)))
