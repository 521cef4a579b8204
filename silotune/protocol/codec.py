"""Codec between name-keyed NumPy arrays and Flower records (the only wire format).

Adapters and updates travel as named fp16 (default) or fp32 arrays; bf16 never reaches
the wire (`Array.from_numpy_ndarray` cannot take it), and the base model is never sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from silotune.adapters.compression import cast_for_wire


def to_record(arrays: Mapping[str, np.ndarray], dtype: str = "fp32") -> ArrayRecord:
    """Name-keyed arrays -> ArrayRecord; float arrays travel as `dtype` ("fp16"/"fp32"),
    other arrays (compressed uint8 blobs) as they are."""
    return ArrayRecord(array_dict={
        k: Array.from_numpy_ndarray(cast_for_wire(k, v, dtype) if v.dtype.kind == "f"
                                    else np.ascontiguousarray(v))
        for k, v in arrays.items()
    })


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """ArrayRecord -> dict of NumPy arrays in their wire dtype (fp16 stays fp16: consumers
    compute in fp32 or wider; validation is the caller's job)."""
    return {key: value.numpy() for key, value in record.items()}


def round_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over name-sorted arrays (names and fp32 bytes): a global round update's
    fingerprint, the same at the coordinator (fp32) and at a silo that received the
    round as fp16 (exactly representable, so the fp32 bytes agree)."""
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key], dtype=np.float32).tobytes())
    return digest.hexdigest()
