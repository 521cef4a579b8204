"""FlexLoRA: dense aggregation and SVD redistribution to each silo's rank.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
Client Resources", NeurIPS 2024 (arXiv 2402.11505); rule from the paper abstract plus a
reconstruction (docs/algorithms.md §3, §4). For every adapted module, with
p_k = n_k / sum_j n_j::

    dW = sum_k p_k s_k B_k A_k       (d_out, d_in)   exact, any ranks
    dW = U diag(S) V^T               (SVD)
    B_k = U[:, :r_k] diag(S[:r_k])   (d_out, r_k)
    A_k = V^T[:r_k, :]               (r_k, d_in)     scale 1

Silo k's error is the Eckart–Young bound sqrt(sum_{i > r_k} sigma_i^2) (§10 #9). Before
loading the factors into a PEFT adapter with scale s_k, divide B by s_k (splitting
sqrt(S) between the factors is equivalent). Server cost: O(K d_out d_in r) for the dense
sum plus an SVD in O(d_out d_in min(d_out, d_in)) per module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from silotune.adapters.types import AdapterError, LoraFactors, LowRankUpdate, SiloAdapter
from silotune.strategies.base import RoundResult, SiloPlan, example_weights
from silotune.strategies.common import holders_of, module_names, module_shapes, pad_factors
from silotune.strategies.flora import flora_stack
from silotune.strategies.plans import Rule, start_plan
from silotune.strategies.registry import register


def flexlora_dense(adapters: Sequence[SiloAdapter]) -> dict[str, np.ndarray]:
    """The exact dense update sum_k p_k s_k B_k A_k per module (float64).

    Parameters
    ----------
    adapters : sequence of SiloAdapter
        The participating silos' adapters, of any ranks. A module trained by only some
        silos is summed over exactly those, with p_k renormalised over that subset.

    Returns
    -------
    dict of str to ndarray of shape (d_out, d_in)
    """
    out: dict[str, np.ndarray] = {}
    for module in module_names(adapters, "FlexLoRA"):
        holders = holders_of(adapters, module)
        d_out, d_in = module_shapes(module, holders)
        dense = np.zeros((d_out, d_in))  # (d_out, d_in)
        for p_k, a in zip(example_weights(holders), holders, strict=True):
            f = a.modules[module]
            dense += (p_k * a.scale) * (f.B.astype(np.float64) @ f.A.astype(np.float64))
        out[module] = dense
    return out


def _check_dense(dense: np.ndarray, rank: int) -> np.ndarray:
    mat = np.asarray(dense, dtype=np.float64)
    if mat.ndim != 2 or 0 in mat.shape or not np.all(np.isfinite(mat)):
        raise AdapterError(f"dense update must be a finite, non-empty 2-D matrix, got {mat.shape}")
    if rank < 1:
        raise AdapterError(f"rank must be at least 1, got {rank}")
    return mat


def flexlora_redistribute(dense: np.ndarray, rank: int) -> LoraFactors:
    """Best rank-`rank` factors of `dense` (scale 1) by truncated SVD.

    Parameters
    ----------
    dense : ndarray of shape (d_out, d_in)
        The aggregated update, e.g. from `flexlora_dense`.
    rank : int
        The silo's rank r >= 1. Ranks above min(d_out, d_in) are zero-padded so that the
        factors always have shape (r, d_in) and (d_out, r).

    Returns
    -------
    LoraFactors
        B = U[:, :r] * S[:r] and A = V^T[:r, :]; ``B @ A`` is the Eckart–Young optimum.
    """
    mat = _check_dense(dense, rank)
    u, s, vt = np.linalg.svd(mat, full_matrices=False)  # (d_out, m), (m,), (m, d_in)
    k = min(rank, s.size)
    factors = LoraFactors(
        A=vt[:k, :],  # (k, d_in)
        B=u[:, :k] * s[:k],  # (d_out, k)
    )
    return pad_factors(factors, rank)


def truncation_error(dense: np.ndarray, rank: int) -> float:
    """Frobenius error of the best rank-`rank` approximation: sqrt(sum_{i > r} sigma_i^2)."""
    sigma = np.linalg.svd(_check_dense(dense, rank), compute_uv=False)  # (m,)
    return math.sqrt(float(np.sum(sigma[rank:] ** 2)))


def factored_svd(f: LoraFactors, keep: int) -> LoraFactors:
    """Top-`keep` SVD of the product B @ A without forming it when the rank is small.

    With B = Q_B R_B and A^T = Q_A R_A (thin QR), B A = Q_B (R_B R_A^T) Q_A^T, so the SVD
    of the small R x R core gives the exact singular triplets of B A:
    O((d_out + d_in) R^2 + R^3) instead of O(d_out d_in min(d_out, d_in)).
    Returns B' = U S and A' = V^T truncated to `keep` (zero-padded if the product has
    lower rank), so that B' A' is the best rank-`keep` approximation (Eckart-Young).
    """
    b, a = f.weighted_b(), f.A.astype(np.float64)  # (d_out, R), (R, d_in)
    if f.rank >= min(b.shape[0], a.shape[1]):
        return flexlora_redistribute(b @ a, keep)
    q_b, r_b = np.linalg.qr(b)  # (d_out, R), (R, R)
    q_a, r_a = np.linalg.qr(a.T)  # (d_in, R), (R, R)
    u, s, vt = np.linalg.svd(r_b @ r_a.T)  # (R, R) each
    n = min(keep, s.size)
    out_b = np.zeros((b.shape[0], keep))
    out_a = np.zeros((keep, a.shape[1]))
    out_b[:, :n] = (q_b @ u[:, :n]) * s[:n]  # (d_out, keep)
    out_a[:n] = (q_a @ vt[:n].T).T  # (keep, d_in)
    return LoraFactors(A=out_a, B=out_b)


@register
class FlexLoRA(Rule):
    """FlexLoRA (Bai et al., NeurIPS 2024): sum the full-size updates, redistribute by SVD."""

    name = "flexlora"

    def plan(self, silo: str, rank: int, state: LowRankUpdate | None,
             round_: int) -> SiloPlan:
        return start_plan(self.shapes, rank, self.seed, state)  # seeded: B = 0, Delta W = 0

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        # sum_k p_k s_k B_k A_k in exact factored form (the FLoRA stack), then its SVD
        # truncated to the largest rank any silo takes back.
        keep = max(self.ranks.values())
        stacked = flora_stack(adapters).modules
        return RoundResult(adapter=LowRankUpdate(
            {name: factored_svd(f, keep) for name, f in stacked.items()}))
