"""Low-rank updates as name-keyed arrays (the wire's naming), and how a receiver sees them.

Pure NumPy: ``<prefix><module>.lora_{A,B,w}`` arrays <-> `LowRankUpdate`, and
`as_received`, the update exactly as it decodes from the wire dtype, so the sender
merges or references the very values the receivers hold.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from silotune.adapters.compression import round_trip
from silotune.adapters.types import LoraFactors, LowRankUpdate


def update_to_arrays(update: LowRankUpdate, prefix: str) -> dict[str, np.ndarray]:
    """Name-keyed arrays ``<prefix><module>.lora_{A,B,w}`` for the wire (w if present)."""
    out: dict[str, np.ndarray] = {}
    for name, f in update.modules.items():
        out[f"{prefix}{name}.lora_A"] = f.A
        out[f"{prefix}{name}.lora_B"] = f.B
        if f.w is not None:
            out[f"{prefix}{name}.lora_w"] = f.w
    return out


def update_from_arrays(arrays: Mapping[str, np.ndarray], prefix: str,
                       scale: float) -> LowRankUpdate:
    """Inverse of `update_to_arrays` for the keys that start with `prefix`."""
    pieces: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        if not key.startswith(prefix):
            continue
        module, _, factor = key[len(prefix):].rpartition(".lora_")
        pieces.setdefault(module, {})[factor] = value
    modules = {m: LoraFactors(A=p["A"], B=p["B"], w=p.get("w"))
               for m, p in sorted(pieces.items())}
    return LowRankUpdate(modules=modules, scale=scale)


def as_received(update: LowRankUpdate, wire_dtype: str) -> LowRankUpdate:
    """`update` exactly as a receiver decodes it from the wire: the sender merges or
    references this version, so that both sides hold bit-identical values."""
    return update_from_arrays(round_trip(update_to_arrays(update, ""), wire_dtype), "",
                              update.scale)
