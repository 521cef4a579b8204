"""Silo resource profiles: memory, compute, bandwidth and time per round.

A deployed silo declares its profile in its node config (``silotune agent --memory-gb 8
--gflops 400 ...``) under the keys below, defined once here: `silotune.client.node` and
the agent write them, `SiloProfile.from_node_config` reads them, and the hello reply
carries the same form to the coordinator. A simulation draws profiles from a named mix
(``--profiles hospital-mix``), cycled over the silos. The FedPipe configurator
(`silotune.planning.configurator`) turns a profile into a `Budget`.

=================  ================================================================
node config key    meaning (all five numbers, or none: a finite number > 0 each)
=================  ================================================================
``memory-gb``      training working set limit, GB
``gflops``         sustained training throughput, GFLOP/s
``upload-mbps``    upload bandwidth, Mbit/s
``download-mbps``  download bandwidth, Mbit/s
``round-seconds``  time budget of one round (compute + transfer), s
``precisions``     optional: comma list of base precisions the silo can train at
                   (names of `silotune.ml.precision.PRECISIONS`; default: all of them)
``profile-name``   optional: a label for the profile in plans and metrics
=================  ================================================================

The figures of the mixes are scaled to the default 135M-parameter model (a research
hospital's GPU server holds everything, a clinic's laptop only a bf16 base with a
small adapter), so that the configurator faces the same trade-offs as with a 7B model
on real hardware.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from silotune.ml.precision import PRECISIONS
from silotune.planning.resources import Budget

GB = 1e9
MBPS = 1e6 / 8  # bytes per second in one megabit per second

# Node-config keys of a declared profile (the agent's flags are the same names: --KEY).
MEMORY_GB: Final = "memory-gb"
GFLOPS: Final = "gflops"
UPLOAD_MBPS: Final = "upload-mbps"
DOWNLOAD_MBPS: Final = "download-mbps"
ROUND_SECONDS: Final = "round-seconds"
RESOURCE_KEYS: Final = (MEMORY_GB, GFLOPS, UPLOAD_MBPS, DOWNLOAD_MBPS, ROUND_SECONDS)
PROFILE_PRECISIONS: Final = "precisions"
PROFILE_NAME: Final = "profile-name"
DECLARED: Final = "declared"  # the name of a declared profile without profile-name
_FIELDS: Final = dict(zip(RESOURCE_KEYS, ("memory_gb", "gflops", "upload_mbps",
                                          "download_mbps", "round_seconds"), strict=True))
_RANGE: Final = "a finite number > 0"


class ProfileError(ValueError):
    """A profile is unknown, incomplete or out of range."""


def parse_precisions(value: str | Iterable[str]) -> frozenset[str]:
    """Base precisions from a comma list ("bf16,fp32") or a sequence of names; raises
    `ProfileError` naming the key and the valid names."""
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = [n.strip() for n in items if n.strip()]
    if not names:
        raise ProfileError(f"{PROFILE_PRECISIONS} = {value!r} is empty; allowed: a comma "
                           f"list of {', '.join(PRECISIONS)}")
    unknown = [n for n in names if n not in PRECISIONS]
    if unknown:
        raise ProfileError(f"{PROFILE_PRECISIONS}: unknown base precision "
                           f"{', '.join(map(repr, unknown))}; allowed: a comma list of "
                           f"{', '.join(PRECISIONS)}")
    return frozenset(names)


@dataclass(frozen=True)
class SiloProfile:
    """What one silo can spend on a round."""

    name: str
    memory_gb: float  # training working set limit
    gflops: float  # sustained training throughput, GFLOP/s
    upload_mbps: float
    download_mbps: float
    round_seconds: float  # time budget of one round (compute + transfer)
    precisions: frozenset[str] | None = None  # base precisions it can train at; None: all

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or '"' in self.name:
            raise ProfileError(f"{PROFILE_NAME} {self.name!r} must be a non-empty label "
                               "without double quotes")
        for key, field in _FIELDS.items():
            value = getattr(self, field)
            try:
                valid = not isinstance(value, bool) and math.isfinite(value) and value > 0
            except TypeError:
                valid = False
            if not valid:
                raise ProfileError(f"profile '{self.name}': {key} = {value!r} is out of "
                                   f"range; allowed: {_RANGE}")
        if self.precisions is not None:
            if not isinstance(self.precisions, frozenset):
                raise ProfileError(f"profile '{self.name}': {PROFILE_PRECISIONS} must be a "
                                   "frozenset of names (see parse_precisions)")
            parse_precisions(self.precisions)  # names the unknown ones

    def allowed_precisions(self, preferred: Sequence[str]) -> tuple[str, ...]:
        """The precisions of `preferred` (the configurator's grid, in its order) that this
        silo can train at."""
        return tuple(p for p in preferred if self.precisions is None or p in self.precisions)

    def budget(self, local_steps: int, seq_len: int) -> Budget:
        return Budget(memory_bytes=self.memory_gb * GB, flops_per_second=self.gflops * 1e9,
                      upload_bytes_per_second=self.upload_mbps * MBPS,
                      download_bytes_per_second=self.download_mbps * MBPS,
                      round_seconds=self.round_seconds, local_steps=local_steps,
                      seq_len=seq_len)

    def to_node_config(self) -> dict[str, float | str]:
        """The node-config / wire form (the keys of the module docstring)."""
        values: dict[str, float | str] = {PROFILE_NAME: self.name}
        values.update({key: float(getattr(self, field)) for key, field in _FIELDS.items()})
        if self.precisions is not None:
            values[PROFILE_PRECISIONS] = ",".join(self.allowed_precisions(tuple(PRECISIONS)))
        return values

    @classmethod
    def from_node_config(cls, values: Mapping[str, Any]) -> SiloProfile | None:
        """The profile declared in a node config, or None when it declares none; a
        partial or out-of-range declaration raises `ProfileError` naming the keys."""
        present = [k for k in RESOURCE_KEYS if k in values]
        if not present:
            extras = [k for k in (PROFILE_NAME, PROFILE_PRECISIONS) if k in values]
            if extras:
                raise ProfileError(
                    f"{' and '.join(extras)} given but no resource profile: declare all of "
                    f"{', '.join(RESOURCE_KEYS)} (missing `silotune agent` flags: "
                    + ", ".join(f"--{k}" for k in RESOURCE_KEYS) + ")")
            return None
        missing = [k for k in RESOURCE_KEYS if k not in values]
        if missing:
            raise ProfileError(
                f"the resource profile declares {', '.join(present)} but lacks "
                f"{', '.join(missing)}; it needs all of {', '.join(RESOURCE_KEYS)}, or none "
                "(missing `silotune agent` flags: "
                + ", ".join(f"--{k}" for k in missing) + ")")
        numbers: dict[str, float] = {}
        for key in RESOURCE_KEYS:
            value = values[key]
            try:
                if isinstance(value, bool):
                    raise ValueError(value)
                numbers[_FIELDS[key]] = float(value)
            except (TypeError, ValueError):
                raise ProfileError(f"node config {key} = {value!r} is not a number; "
                                   f"allowed: {_RANGE}") from None
        precisions = values.get(PROFILE_PRECISIONS)
        return cls(str(values.get(PROFILE_NAME, DECLARED)), **numbers,
                   precisions=None if precisions is None else parse_precisions(precisions))


def weakest(profiles: list[SiloProfile]) -> SiloProfile:
    """The element-wise minimum: a configuration that fits it fits every silo (its
    precisions are those every silo supports)."""
    declared = [p.precisions for p in profiles if p.precisions is not None]
    common = frozenset.intersection(*declared) if declared else None
    if common is not None and not common:
        raise ProfileError("the silos declare no base precision in common: "
                           + "; ".join(f"{p.name}: {','.join(sorted(p.precisions))}"
                                       for p in profiles if p.precisions is not None))
    return SiloProfile("weakest", min(p.memory_gb for p in profiles),
                       min(p.gflops for p in profiles),
                       min(p.upload_mbps for p in profiles),
                       min(p.download_mbps for p in profiles),
                       min(p.round_seconds for p in profiles), common)


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
