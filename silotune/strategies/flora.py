"""FLoRA: exact aggregation of heterogeneous-rank LoRA adapters by stacking.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024 (arXiv 2409.05976); reference code
``ATP-1010/FederatedLLM``, ``fed_utils/model_aggregation.py`` (``stacking=True``).

For every adapted module, with p_k = n_k / sum_j n_j and the silo's scale s_k folded into
its A factor::

    A_g = [p_1 s_1 A_1; ...; p_K s_K A_K]   (R, d_in)    R = sum_k r_k
    B_g = [B_1 | ... | B_K]                 (d_out, R)
    B_g @ A_g = sum_k p_k s_k B_k A_k       exactly: no cross terms

p_k multiplies A only (weighting both factors would give p_k^2). The stacked rank R is
computed from the tensors, never assumed (the public code's hard-coded R breaks with
partial participation). Silos are stacked in the order given; callers pass them sorted
by silo id so that a run is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from silotune.strategies.base import (
    AdapterError,
    LoraFactors,
    LowRankUpdate,
    SiloAdapter,
    example_weights,
)


def flora_stack(adapters: Sequence[SiloAdapter]) -> LowRankUpdate:
    """Stack silo adapters into one exact global update (scale 1).

    Modules trained by only some silos are stacked over exactly those silos, with p_k
    renormalised over that subset. Inputs are not mutated.
    """
    if not adapters:
        raise AdapterError("FLoRA needs at least one adapter")
    modules = sorted({m for a in adapters for m in a.modules})
    stacked: dict[str, LoraFactors] = {}
    for module in modules:
        holders = [a for a in adapters if module in a.modules]
        p = example_weights(holders)
        # float(...) keeps the factors' dtype (a NumPy float64 scalar would upcast fp32)
        a_blocks = [float(p_k * a.scale) * a.modules[module].A
                    for p_k, a in zip(p, holders, strict=True)]
        b_blocks = [a.modules[module].B for a in holders]
        stacked[module] = LoraFactors(
            A=np.concatenate(a_blocks, axis=0),  # (R, d_in)
            B=np.concatenate(b_blocks, axis=1),  # (d_out, R)
        )
    return LowRankUpdate(modules=stacked, scale=1.0)

