"""Seeded LoRA starts: factors every party regenerates from a public seed.

FFA-LoRA's frozen A_0 and the common starting adapter of the rules come from
(seed, module name), so a silo regenerates its start instead of downloading it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import DTypeLike

from silotune.adapters.types import AdapterError, LoraFactors, LowRankUpdate


def _module_seed(seed: int, module: str) -> int:
    """A 64-bit seed from (seed, module name), stable across processes and platforms."""
    digest = hashlib.sha256(f"silotune-ffa:{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def frozen_a(
    seed: int, module: str, rank: int, d_in: int, *, dtype: DTypeLike = np.float32
) -> np.ndarray:
    """The frozen A_0 of `module`, shape (rank, d_in), deterministic in (seed, module).

    Parameters
    ----------
    seed : int
        The federation's shared seed.
    module : str
        Module name; hashed with SHA-256 together with `seed` (not Python's salted hash).
    rank, d_in : int
        Output shape (rank, d_in), both >= 1.
    dtype : dtype
        Result dtype (default float32, as PEFT stores the factors); draws are float64.

    Returns
    -------
    ndarray of shape (rank, d_in)
        Entries uniform on [-1/sqrt(d_in), 1/sqrt(d_in)), PEFT's Kaiming-uniform bound
        (a = sqrt(5)). Rows are drawn in order, so the rank-r result is the first r rows of
        any larger rank's result for the same (seed, module, d_in).
    """
    if rank < 1 or d_in < 1:
        raise AdapterError(f"frozen A needs rank >= 1 and d_in >= 1, got ({rank}, {d_in})")
    bound = 1.0 / math.sqrt(d_in)
    rng = np.random.default_rng(_module_seed(seed, module))
    return rng.uniform(-bound, bound, size=(rank, d_in)).astype(dtype)  # (rank, d_in)


def seeded_start(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int) -> LowRankUpdate:
    """A common starting adapter: A from the shared seed (PEFT's Kaiming bound), B = 0.

    Rows of A are prefix-consistent, so the rank-r start is the rank-r view of any larger
    one: silos regenerate their own from (seed, rank) and the module shapes.
    """
    modules = {m: LoraFactors(A=frozen_a(seed, m, rank, d_in).astype(np.float64),
                              B=np.zeros((d_out, rank)))
               for m, (d_out, d_in) in shapes.items()}
    return LowRankUpdate(modules=modules, scale=1.0)
