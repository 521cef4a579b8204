"""A silo's last reply, kept so that a round is never trained (or spent) twice.

If the coordinator dies after a silo trained round t but before it received the reply,
the resumed coordinator asks for round t again. Training again would spend the silo's
privacy budget a second time and put round t in its ledger twice. Instead the silo keeps
its last upload (which has already left the silo, so keeping it reveals nothing new) and
sends it again when asked for the same federation, round and global base.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from silotune.files import atomic_write_json, atomic_write_npz
from silotune.protocol.messages import TrainReply

REPLY_ARRAYS = "last-reply.npz"
REPLY_META = "last-reply.json"


def save_reply(folder: Path, federation: str, round_: int, fingerprints: list[str],
               reply: TrainReply) -> None:
    """Keep `reply` as the answer to (`federation`, `round_`, base `fingerprints`)."""
    atomic_write_npz(folder / REPLY_ARRAYS, reply.arrays)
    fields = {k: v for k, v in dataclasses.asdict(reply).items() if k != "arrays"}
    atomic_write_json(folder / REPLY_META, {"federation": federation, "round": round_,
                                            "fingerprints": fingerprints, "reply": fields},
                      indent=None)


def load_reply(folder: Path, federation: str, round_: int,
               fingerprints: list[str]) -> TrainReply | None:
    """The reply kept for exactly this request, or None."""
    try:
        meta = json.loads((folder / REPLY_META).read_text())
        if (meta["federation"], meta["round"], meta["fingerprints"]) != (
                federation, round_, fingerprints):
            return None
        with np.load(folder / REPLY_ARRAYS, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        return TrainReply(**meta["reply"], arrays=arrays)
    except (OSError, ValueError, KeyError, TypeError):
        return None
