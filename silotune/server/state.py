"""The coordinator's global state: the merged rounds, and the global adapter on top.

A silo needs the merged rounds it lacks to reach the current global base exactly; the
coordinator keeps them as the silos decode them from the wire (fp16 or fp32), with each
round's fingerprint, so that every copy of the global base stays bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from silotune.adapters.codec import as_received, update_from_arrays, update_to_arrays
from silotune.adapters.types import LowRankUpdate
from silotune.protocol import keys as P
from silotune.protocol.codec import round_digest


@dataclass
class GlobalState:
    """Merged rounds so far (what a silo needs to reach the current global base) and the
    global adapter that rules of the FedIT family carry on top of it."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    fingerprints: list[str] = field(default_factory=list)
    adapter: LowRankUpdate | None = None  # global adapter on top of the base (FedIT family)

    def add(self, update: LowRankUpdate, wire_dtype: str) -> LowRankUpdate:
        """Record `update` as the silos will decode it; return that version to merge."""
        version = len(self.fingerprints) + 1
        received = as_received(update, wire_dtype)
        new = update_to_arrays(received, f"{P.UPDATE_PREFIX}{version}/")
        self.arrays.update(new)
        self.scales[str(version)] = update.scale
        self.fingerprints.append(round_digest(new))
        return received

    def since(self, version: int) -> dict[str, np.ndarray]:
        """The arrays of the merged rounds after `version` (what a silo holding rounds
        1..version lacks)."""
        return {k: v for k, v in self.arrays.items()
                if int(k[len(P.UPDATE_PREFIX):].partition("/")[0]) > version}

    def updates(self) -> list[LowRankUpdate]:
        """The merged rounds' updates, in order (as the silos decode them)."""
        return [update_from_arrays(self.arrays, f"{P.UPDATE_PREFIX}{t}/", self.scales[str(t)])
                for t in range(1, len(self.fingerprints) + 1)]
