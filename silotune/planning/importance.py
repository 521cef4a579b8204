"""FedPipe importance: smoothing on the silo, aggregation at the coordinator.

Fang et al., "Automated Federated Pipeline for Parameter-Efficient Fine-Tuning of Large
Language Models" (arXiv 2404.06448), first stage: find the important weights. The
sensitivity and its smoothing are AdaLoRA's (Zhang et al., ICLR 2023, eqs. 8-11), with
beta_1 = beta_2 = 0.85 (docs/algorithms.md §6)::

    I_bar(t) = b1 I_bar(t-1) + (1 - b1) I(t)
    U_bar(t) = b2 U_bar(t-1) + (1 - b2) |I(t) - I_bar(t)|
    s = I_bar(T) * U_bar(T)

applied to each matrix's summed sensitivity (project choice: per-element state for every
candidate matrix of the base would cost two extra copies of the model on the silo). The
coordinator normalises each silo's scores to sum 1 (so a silo with a larger loss does not
dominate), averages them with weights p_k = n_k / sum n_j, and sums each matrix type over
the layers, since the configurator adapts a type in every layer.

Pure NumPy; no Flower import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

BETA1 = 0.85
BETA2 = 0.85


def smoothed_sensitivity(raw: np.ndarray, beta1: float = BETA1,
                         beta2: float = BETA2) -> np.ndarray:
    """AdaLoRA's smoothed score ``I_bar * U_bar`` after the last step.

    `raw` is (steps, matrices) of per-step sensitivities; returns (matrices,).
    Both moving averages start at 0, as in AdaLoRA's RankAllocator.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if raw.ndim != 2 or raw.shape[0] < 1:
        raise ValueError(f"raw sensitivities must be (steps >= 1, matrices), got {raw.shape}")
    i_bar = np.zeros(raw.shape[1])
    u_bar = np.zeros(raw.shape[1])
    for step in raw:  # (matrices,)
        i_bar = beta1 * i_bar + (1.0 - beta1) * step
        u_bar = beta2 * u_bar + (1.0 - beta2) * np.abs(step - i_bar)
    result: np.ndarray = i_bar * u_bar
    return result


def aggregate_importance(replies: Sequence[tuple[int, Mapping[str, float]]]
                         ) -> dict[str, float]:
    """Coordinator side: per-matrix scores from (n_k, {module: score}) silo replies,
    each normalised to sum 1, averaged with weights n_k / sum n_j; returns module -> score
    over the union of the reported modules (a module a silo did not report counts 0)."""
    if not replies:
        raise ValueError("no importance replies to aggregate")
    total_n = sum(n for n, _ in replies)
    if total_n <= 0 or any(n <= 0 for n, _ in replies):
        raise ValueError("every importance reply needs a positive example count")
    out: dict[str, float] = {}
    for n, scores in replies:
        values = np.array([max(0.0, float(v)) for v in scores.values()])
        norm = float(values.sum())
        if not np.isfinite(norm):
            raise ValueError("importance scores must be finite")
        for module, value in scores.items():
            share = max(0.0, float(value)) / norm if norm > 0 else 0.0
            out[module] = out.get(module, 0.0) + n / total_n * share
    return dict(sorted(out.items()))


def importance_by_type(scores: Mapping[str, float]) -> dict[str, float]:
    """Sum module scores by matrix type (last name component): 'q_proj' -> sum over layers."""
    out: dict[str, float] = {}
    for module, value in scores.items():
        kind = module.rpartition(".")[2]
        out[kind] = out.get(kind, 0.0) + value
    return dict(sorted(out.items()))
