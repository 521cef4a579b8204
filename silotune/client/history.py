"""A silo's durable copy of the global update history: the downlink sends only new rounds.

FLoRA's global base is the original model merged with every round's update, in order, so
a silo needs all of them. Sending all of them in every train message makes the downlink
grow with the round number; instead the coordinator sends only the rounds after the last
one the silo confirmed holding (`protocol.FIRST_SENT_ROUND`), and the silo keeps every
round it receives on disk in its state folder, one file per round, checked against the
round's fingerprint when written and when read. A silo that cannot produce a round (its
folder was lost or damaged) raises `MissingRoundsError`; the coordinator then sends it
the whole history again in the same round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from silotune.files import atomic_write_npz
from silotune.protocol import keys as P
from silotune.protocol.codec import round_digest

log = logging.getLogger(__name__)


class MissingRoundsError(RuntimeError):
    """The silo lacks (or holds a damaged copy of) rounds it was told it has."""


def round_arrays(arrays: Mapping[str, np.ndarray], round_: int) -> dict[str, np.ndarray]:
    """The arrays of global update `round_` (names ``round-<t>/...``)."""
    prefix = f"{P.UPDATE_PREFIX}{round_}/"
    return {k: v for k, v in arrays.items() if k.startswith(prefix)}


def complete_history(folder: Path, received: Mapping[str, np.ndarray],
                     fingerprints: Sequence[str], first_sent: int) -> dict[str, np.ndarray]:
    """The arrays of every round 1..len(`fingerprints`): rounds before `first_sent` read
    from `folder`, the others taken from `received` and kept in `folder`. Every round is
    checked against its fingerprint; raises `MissingRoundsError` naming the rounds the
    silo cannot produce, ValueError for a received round that does not match."""
    out: dict[str, np.ndarray] = {}
    missing: list[int] = []
    for t, fingerprint in enumerate(fingerprints, start=1):
        path = folder / f"{P.UPDATE_PREFIX}{t}.npz"
        if t >= first_sent:
            arrays = round_arrays(received, t)
            if round_digest(arrays) != fingerprint:
                raise ValueError(f"global update of round {t} does not match its "
                                 "fingerprint (damaged in transit?)")
            try:
                atomic_write_npz(path, arrays)
            except OSError as err:  # this round still trains; a later one asks for all
                log.warning("could not keep global round %d in %s: %s", t, folder, err)
        else:
            try:
                with np.load(path, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
            except (OSError, ValueError):
                arrays = {}
            if round_digest(arrays) != fingerprint:
                missing.append(t)
                continue
        out.update(arrays)
    if missing:  # the folder stays in the silo's own log: no local facts in the reply
        log.warning("global rounds %s missing or damaged in %s", missing, folder)
        raise MissingRoundsError(
            f"this silo's copy of global rounds {missing} is missing or damaged; "
            "the coordinator resends the whole history")
    return out
