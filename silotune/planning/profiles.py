"""Silo resource profiles: memory, compute, bandwidth and time per round.

A deployed silo declares its profile in its node config (``memory-gb``, ``gflops``,
``upload-mbps``, ``download-mbps``, ``round-seconds``); a simulation draws them from a
named mix (``--profiles hospital-mix``), cycled over the silos. The FedPipe
configurator (`silotune.planning.configurator`) turns a profile into a `Budget`.

The figures of the mixes are scaled to the default 135M-parameter model (a research
hospital's GPU server holds everything, a clinic's laptop only a bf16 base with a
small adapter), so that the configurator faces the same trade-offs as with a 7B model
on real hardware.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from silotune.planning.resources import Budget

GB = 1e9
MBPS = 1e6 / 8  # bytes per second in one megabit per second


class ProfileError(ValueError):
    """A profile is unknown, incomplete or out of range."""


@dataclass(frozen=True)
class SiloProfile:
    """What one silo can spend on a round."""

    name: str
    memory_gb: float  # training working set limit
    gflops: float  # sustained training throughput, GFLOP/s
    upload_mbps: float
    download_mbps: float
    round_seconds: float  # time budget of one round (compute + transfer)

    def __post_init__(self) -> None:
        for key in ("memory_gb", "gflops", "upload_mbps", "download_mbps", "round_seconds"):
            value = getattr(self, key)
            if not value > 0:
                raise ProfileError(f"profile '{self.name}': {key.replace('_', '-')} = "
                                   f"{value!r} must be > 0")

    def budget(self, local_steps: int, seq_len: int) -> Budget:
        return Budget(memory_bytes=self.memory_gb * GB, flops_per_second=self.gflops * 1e9,
                      upload_bytes_per_second=self.upload_mbps * MBPS,
                      download_bytes_per_second=self.download_mbps * MBPS,
                      round_seconds=self.round_seconds, local_steps=local_steps,
                      seq_len=seq_len)

    def to_node_config(self) -> dict[str, float | str]:
        """The node-config / wire form (kebab-case keys)."""
        return {"profile": self.name, "memory-gb": self.memory_gb, "gflops": self.gflops,
                "upload-mbps": self.upload_mbps, "download-mbps": self.download_mbps,
                "round-seconds": self.round_seconds}

    @classmethod
    def from_node_config(cls, values: Mapping[str, Any]) -> SiloProfile | None:
        """The profile declared in a node config, or None when it declares none."""
        keys = ("memory-gb", "gflops", "upload-mbps", "download-mbps", "round-seconds")
        present = [k for k in keys if k in values]
        if not present:
            return None
        missing = [k for k in keys if k not in values]
        if missing:
            raise ProfileError(f"node config declares {present} but lacks {missing}; a "
                               "resource profile needs all of " + ", ".join(keys))
        try:
            numbers = [float(values[k]) for k in keys]
        except (TypeError, ValueError) as err:
            raise ProfileError(f"node config profile values must be numbers: {err}") from None
        return cls(str(values.get("profile", "declared")), *numbers)


def weakest(profiles: list[SiloProfile]) -> SiloProfile:
    """The element-wise minimum: a configuration that fits it fits every silo."""
    return SiloProfile("weakest", min(p.memory_gb for p in profiles),
                       min(p.gflops for p in profiles),
                       min(p.upload_mbps for p in profiles),
                       min(p.download_mbps for p in profiles),
                       min(p.round_seconds for p in profiles))


_RESEARCH = SiloProfile("research-hospital", memory_gb=4.0, gflops=400.0,
                        upload_mbps=100.0, download_mbps=100.0, round_seconds=600.0)
_REGIONAL = SiloProfile("regional-hospital", memory_gb=2.0, gflops=50.0,
                        upload_mbps=20.0, download_mbps=50.0, round_seconds=60.0)
_CLINIC = SiloProfile("clinic-laptop", memory_gb=1.0, gflops=40.0,
                      upload_mbps=5.0, download_mbps=20.0, round_seconds=600.0)

MIXES: dict[str, tuple[SiloProfile, ...]] = {
    # silo 0 a research hospital, 1 and 3 regional hospitals, 2 a clinic's laptop
    "hospital-mix": (_RESEARCH, _REGIONAL, _CLINIC, _REGIONAL),
    "research-hospitals": (_RESEARCH,),
    "clinics": (_CLINIC,),
}


def mix_profiles(name: str, num_silos: int) -> list[SiloProfile]:
    """The profiles of `num_silos` silos drawn from mix `name` (cycled in order)."""
    try:
        mix = MIXES[name]
    except KeyError:
        raise ProfileError(f"unknown profile mix '{name}'; valid mixes: "
                           f"{', '.join(sorted(MIXES))}") from None
    return [mix[i % len(mix)] for i in range(num_silos)]
