"""Codec between name-keyed NumPy arrays and Flower records (the only wire format).

Adapters and updates travel as named fp32 arrays; bf16 never reaches the wire
(`Array.from_numpy_ndarray` cannot take it), and the base model is never sent.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """fp32 arrays -> ArrayRecord (other float types are converted first)."""
    return ArrayRecord(array_dict={
        k: Array.from_numpy_ndarray(np.ascontiguousarray(v, dtype=np.float32))
        for k, v in arrays.items()
    })


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> dict of NumPy arrays (as sent; validation is the caller's job)."""
    return {k: v.numpy() for k, v in record.items()}
