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

from collections.abc import Sequence

import numpy as np

from silotune.adapters.types import AdapterError, SiloAdapter
from silotune.strategies.base import example_weights
from silotune.strategies.common import holders_of, module_names, module_shapes


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
