"""The ledger heads a coordinator recorded, as an auditor checks a ledger against them
(``silotune audit --heads metrics.json``; docs/privacy.md §6, "Coordinator-kept heads").

The coordinator (silotune/server/heads.py) writes in a run's ``metrics.json`` the last
head it accepted from each silo (``ledger_heads``: seq, entry hash, signer key, whether
the key was pinned at enrolment) and, per round, the heads it accepted in that round. A
ledger must hold every one of them at its seq, signed by that key: a ledger shorter than
a head was truncated, another hash at that seq means it was rolled back or forked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from silotune.privacy.ledger import key_id


class HeadsFileError(ValueError):
    """The coordinator's metrics.json is missing, unreadable or records no ledger heads."""


# Which key an audit trusted (its verdict), strongest first.
KEY_AUDITOR = "given by the auditor (--public-key)"
KEY_PINNED = "pinned at enrolment (the coordinator's registry)"
KEY_FIRST_USE = "NOT pinned: trusted on first use by the coordinator"
KEY_SEQ0 = "NOT pinned: the key that signed seq 0"
PINNED_SOURCES = (KEY_AUDITOR, KEY_PINNED)


@dataclass(frozen=True)
class RecordedHeads:
    """What a coordinator recorded about one silo's ledger (its metrics.json): the last
    head with its key, and every head it accepted, each with the round it came in."""

    key: str  # raw Ed25519 public key, hex
    pinned: bool
    heads: tuple[tuple[int, str, int | None], ...]  # (seq, entry_hash, round or None)


def load_heads(path: Path | str) -> dict[str, RecordedHeads]:
    """The ledger heads a coordinator recorded per silo in a run's metrics.json (the
    ``ledger_heads`` of the run and of each round). Raises `HeadsFileError`."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
        last = metrics["ledger_heads"]
        rows = [r for r in metrics.get("rounds", []) if isinstance(r, dict)]
        recorded = {}
        for silo, head in last.items():
            seen: dict[tuple[int, str], int | None] = {
                (int(head["seq"]), str(head["entry_hash"])): None}
            for r in rows:
                if silo in r.get("ledger_heads", {}):
                    got = r["ledger_heads"][silo]
                    seen[(int(got["seq"]), str(got["entry_hash"]))] = int(r["round"])
            recorded[str(silo)] = RecordedHeads(
                str(head["key"]), bool(head["pinned"]),
                tuple(sorted((seq, h, rnd) for (seq, h), rnd in seen.items())))
    except OSError as exc:
        raise HeadsFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HeadsFileError(f"{path}: no readable ledger_heads ({exc!r}); pass the "
                             "metrics.json of a run whose coordinator records heads") from exc
    return recorded


def check_heads(entries: Sequence[dict[str, Any]], recorded: RecordedHeads) -> list[str]:
    """Problems of a ledger against the heads a coordinator recorded (each names the
    entry): every recorded head must be in the ledger at its seq, signed by the key."""
    problems = []
    for seq, entry_hash, round_ in recorded.heads:
        when = f"round {round_}" if round_ is not None else "the run's last head"
        if seq >= len(entries):
            problems.append(f"seq {seq}: missing: the coordinator recorded head seq {seq} "
                            f"({entry_hash[:12]}, {when}) but the ledger ends at seq "
                            f"{len(entries) - 1} (truncated or rolled back)")
        elif entries[seq].get("entry_hash") != entry_hash:
            problems.append(f"seq {seq}: entry_hash: {str(entries[seq].get('entry_hash'))[:12]}"
                            f" is not the head the coordinator recorded ({entry_hash[:12]}, "
                            f"{when}): the ledger was rolled back or forked")
        elif entries[seq].get("signer_public_key") != recorded.key:
            problems.append(f"seq {seq}: signer_public_key: not the key the coordinator "
                            "recorded for this silo (re-signed with another key)")
    return problems


def against_heads(entries: Sequence[dict[str, Any]], silo: str,
                  public_key: Ed25519PublicKey | None,
                  heads: Mapping[str, RecordedHeads] | None,
                  ) -> tuple[Ed25519PublicKey | None, str, list[str], int]:
    """The key to verify a ledger of `silo` with (the auditor's `public_key`, else the
    key its coordinator recorded, else None: seq 0's), which key that is (``KEY_*``), the
    ledger's problems against the recorded heads, and how many heads were checked."""
    source = KEY_AUDITOR if public_key is not None else KEY_SEQ0
    if heads is None:
        return public_key, source, [], 0
    recorded = heads.get(silo)
    if recorded is None:
        return public_key, source, [f"heads: the coordinator recorded no ledger head for "
                                    f"silo {silo!r} (recorded: {sorted(heads)})"], 0
    problems = check_heads(entries, recorded)
    coordinator_key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(recorded.key))
    if public_key is None:
        return (coordinator_key, KEY_PINNED if recorded.pinned else KEY_FIRST_USE,
                problems, len(recorded.heads))
    if key_id(public_key) != key_id(coordinator_key):
        problems.insert(0, f"heads: the coordinator recorded key {key_id(coordinator_key)} "
                           f"for this silo, not the --public-key {key_id(public_key)}")
    return public_key, source, problems, len(recorded.heads)
