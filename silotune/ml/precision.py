"""Base-model precisions a silo can train at, and the quantised-base merge rule.

A silo short of memory trains on a lower-precision copy of the global base (FedPipe,
Fang et al., arXiv 2404.06448, §"quantisation": a server-specific bit width per edge
server). The LoRA factors always train in fp32, and the global base that FLoRA merges
every round stays an fp32 master copy, so every silo and the coordinator keep
bit-identical bases whatever precision each one trains at (docs/algorithms.md §6,
"clash with FLoRA merging": merge into the master, re-quantise for training only).

Registered here: fp32 and bf16, both of which PyTorch trains on CPU. int8 / NF4 bases
need bitsandbytes (CUDA only) and are not offered to the configurator; their merge rule
(dequantise, add the merged update, requantise from the fp32 master) is
`requantise_merge`, written and tested in NumPy (blockwise absmax, QLoRA's layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Precision:
    """A base precision: its name, storage per parameter and PyTorch dtype name."""

    name: str
    bytes_per_param: float
    torch_name: str


# Highest precision first: the configurator prefers the first one that fits.
PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", 4.0, "float32"),
    Precision("bf16", 2.0, "bfloat16"),
)}


class UnknownPrecisionError(ValueError):
    """The requested base precision is not registered."""


def get(name: str) -> Precision:
    """The registered precision `name`; an unknown name raises and lists the valid ones."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise UnknownPrecisionError(
            f"unknown base precision '{name}'; valid: {', '.join(PRECISIONS)} (int8/NF4 "
            "bases need bitsandbytes on CUDA and are not supported on this platform)"
        ) from None


def torch_dtype(name: str) -> torch.dtype:
    """PyTorch dtype of the registered precision `name`."""
    import torch  # only the training side needs it; the configurator stays pure

    dtype: torch.dtype = getattr(torch, get(name).torch_name)
    return dtype


# -- int8 / NF4-style bases: the merge rule, in NumPy -------------------------------------
def quantise_blockwise(w: np.ndarray, bits: int = 8, block: int = 64
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax quantisation in blocks of `block` values (QLoRA's layout).

    Returns (codes (n,) int8, scales (ceil(n / block),) float32); the error of every
    value is at most half a step, ``scale / (2^(bits-1) - 1) / 2``.
    """
    flat = np.asarray(w, dtype=np.float32).ravel()  # (n,)
    pad = (-flat.size) % block
    blocks = np.pad(flat, (0, pad)).reshape(-1, block)  # (n_blocks, block)
    levels = 2 ** (bits - 1) - 1
    scales = np.abs(blocks).max(axis=1)  # (n_blocks,)
    safe = np.where(scales > 0, scales, 1.0)
    codes = np.rint(blocks / safe[:, None] * levels).astype(np.int8)
    return codes.ravel()[: flat.size], scales.astype(np.float32)


def dequantise_blockwise(codes: np.ndarray, scales: np.ndarray, shape: tuple[int, ...],
                         bits: int = 8, block: int = 64) -> np.ndarray:
    """Inverse of `quantise_blockwise` (up to its rounding), as float32 of `shape`."""
    levels = 2 ** (bits - 1) - 1
    pad = (-codes.size) % block
    blocks = np.pad(codes.astype(np.float32), (0, pad)).reshape(-1, block)
    values = blocks * (scales[:, None] / levels)
    return values.ravel()[: codes.size].reshape(shape)


def requantise_merge(master: np.ndarray, delta: np.ndarray, bits: int = 8, block: int = 64
                     ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """One FLoRA round for a quantised silo: merge `delta` into the fp32 `master`, then
    requantise the new master for training.

    Returns (new master, (codes, scales)). Quantising from the master every round keeps
    the error at half a step whatever the number of rounds; adding `delta` to the
    dequantised codes instead would accumulate one rounding per round.
    """
    merged = np.asarray(master, dtype=np.float32) + np.asarray(delta, dtype=np.float32)
    return merged, quantise_blockwise(merged, bits, block)
