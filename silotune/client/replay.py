"""A silo's last reply, kept so that a round is never trained (or spent) twice.

If the coordinator dies after a silo trained round t but before it received the reply,
the resumed coordinator asks for round t again. Training again would spend the silo's
privacy budget a second time and put round t in its ledger twice. Instead the silo keeps
its last upload (which has already left the silo, so keeping it reveals nothing new) and
sends it again when asked for the same federation, round and global base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPLY_ARRAYS = "last-reply.npz"
REPLY_META = "last-reply.json"


@dataclass(frozen=True)
class StoredReply:
    """The adapter arrays, metrics and info of one sent reply."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    info: dict[str, Any]


def save_reply(folder: Path, federation: str, round_: int, fingerprints: list[str],
               reply: StoredReply) -> None:
    """Keep `reply` as the answer to (`federation`, `round_`, base `fingerprints`)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "last-reply.tmp.npz"
    np.savez(tmp, allow_pickle=False, **reply.arrays)
    tmp.replace(folder / REPLY_ARRAYS)
    meta = {"federation": federation, "round": round_, "fingerprints": fingerprints,
            "metrics": reply.metrics, "info": reply.info}
    (folder / "last-reply.tmp").write_text(json.dumps(meta))
    (folder / "last-reply.tmp").replace(folder / REPLY_META)


def load_reply(folder: Path, federation: str, round_: int,
               fingerprints: list[str]) -> StoredReply | None:
    """The reply kept for exactly this request, or None."""
    try:
        meta = json.loads((folder / REPLY_META).read_text())
        if (meta["federation"], meta["round"], meta["fingerprints"]) != (
                federation, round_, fingerprints):
            return None
        with np.load(folder / REPLY_ARRAYS, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError):
        return None
    return StoredReply(arrays, dict(meta["metrics"]), dict(meta["info"]))
