"""Coordinator-kept ledger heads: a silo's ledger may only grow (docs/privacy.md,
"Coordinator-kept heads").

Anyone with a silo's disk can truncate its ledger, roll it back to an earlier copy
(which resets its budget) or re-chain and re-sign it with a fresh key; the ledger alone
cannot show it. So the coordinator keeps, per silo, the last head it accepted (seq,
entry hash, signer key) and every reply that spent budget carries the entries appended
since (`silotune.privacy.ledger.chain_links`: seq, prev_hash, entry_hash, signature).
`check_chain` accepts the reply only if those entries extend that head:

- seqs consecutive from the head's seq + 1, each prev_hash the previous entry hash,
  the first one the head's (else: rolled back, truncated, forked); or the head itself
  again (a silo re-sends its kept reply to a coordinator resumed after a crash);
- every signature valid under the silo's key: the key pinned at enrolment in the silo
  registry (silotune/server/registry.py) or, without one, the key first seen for the
  silo (trust on first use, recorded as such: ``pinned`` false).

What the coordinator cannot check: that an entry hash is the hash of a well-formed
entry (the entry covers private fields, the dataset size and fingerprint, so it stays
on the silo). The signature binds the hash to the silo's key, and `silotune audit
--heads metrics.json` later checks the ledger itself against every head recorded here.

The book of heads travels in the checkpoint and in ``metrics.json`` (``ledger_heads``);
a deployed coordinator also keeps one book for all its runs (`HEADS_ENV`), so a rollback
between two runs is refused too.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from silotune.files import atomic_write_json
from silotune.privacy.ledger import GENESIS_HASH, key_id

HEADS_ENV = "SILOTUNE_LEDGER_HEADS"  # the coordinator's book for all its runs (a path)


class HeadError(ValueError):
    """A reply's ledger chain does not extend the head the coordinator recorded."""


@dataclass(frozen=True)
class Head:
    """The newest ledger entry the coordinator accepted from one silo."""

    seq: int
    entry_hash: str
    key: str  # the signer's raw Ed25519 public key, hex
    pinned: bool  # True: the key registered at enrolment; False: trusted on first use

    @property
    def key_id(self) -> str:
        return key_id(_public_key(self.key))

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "entry_hash": self.entry_hash, "key": self.key,
                "key_id": self.key_id, "pinned": self.pinned}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Head:
        return cls(int(data["seq"]), str(data["entry_hash"]), str(data["key"]),
                   bool(data["pinned"]))


@dataclass(frozen=True)
class Link:
    """One ledger entry as a reply carries it: its place in the chain and signature."""

    seq: int
    prev_hash: str
    entry_hash: str
    signature: str

    @classmethod
    def from_wire(cls, item: object) -> Link:
        if (not isinstance(item, list) or len(item) != 4 or isinstance(item[0], bool)
                or not isinstance(item[0], int) or not all(isinstance(v, str)
                                                           for v in item[1:])):
            raise HeadError(f"ledger chain entry {item!r} is not [seq, prev_hash, "
                            "entry_hash, signature]")
        return cls(*item)


def check_chain(last: Head | None, chain: Sequence[object], head: str | None,
                key: str | None, pinned_key: str | None) -> Head:
    """The silo's new head if `chain` (a reply's ``ledger-chain``, ending at its
    ``ledger-head``, signed by ``ledger-key``) extends `last`; `HeadError` saying how it
    does not otherwise. `pinned_key`: the key registered for the silo at enrolment."""
    if not chain or key is None or head is None:
        raise HeadError("the reply spent budget but carries no ledger chain, "
                        "head and key; the coordinator cannot check that its ledger only "
                        "grows (an agent older than the coordinator? upgrade it)")
    links = [Link.from_wire(item) for item in chain]
    newest = links[-1]
    if newest.entry_hash != head:
        raise HeadError(f"ledger chain ends at {newest.entry_hash[:12]}, not at "
                        f"the reply's head {head[:12]}")
    _check_key(key, last, pinned_key)
    for before, after in itertools.pairwise(links):
        if after.seq != before.seq + 1 or after.prev_hash != before.entry_hash:
            raise HeadError(f"ledger seq {after.seq} does not follow seq "
                            f"{before.seq} in the reply's chain (a broken ledger)")
    first = links[0]
    if last is None:
        if first.seq == 0 and first.prev_hash != GENESIS_HASH:
            raise HeadError("ledger seq 0 does not start from the genesis hash")
    elif (newest.seq, newest.entry_hash) == (last.seq, last.entry_hash):
        pass  # the same head again: a kept reply re-sent to a resumed coordinator
    elif newest.seq <= last.seq:
        raise HeadError(f"ledger seq {newest.seq} does not extend the last head seq "
                        f"{last.seq} (rolled back or truncated?)")
    elif first.seq != last.seq + 1:
        raise HeadError(f"the reply's ledger chain starts at seq {first.seq}, "
                        f"not right after the last head seq {last.seq} (entries withheld)")
    elif first.prev_hash != last.entry_hash:
        raise HeadError(f"ledger seq {first.seq} does not extend the last head seq {last.seq} "
                        f"({last.entry_hash[:12]}): its prev_hash is {first.prev_hash[:12]} "
                        "(the ledger was rolled back and rewritten, or forked)")
    public = _public_key(key)
    for link in links:
        try:
            public.verify(bytes.fromhex(link.signature), bytes.fromhex(link.entry_hash))
        except (ValueError, InvalidSignature):
            raise HeadError(f"ledger seq {link.seq}: the signature does not "
                            f"verify under key {key_id(public)}") from None
    return Head(newest.seq, newest.entry_hash, key, pinned=pinned_key is not None)


def _check_key(key: str, last: Head | None, pinned_key: str | None) -> None:
    try:
        found = key_id(_public_key(key))
    except ValueError:
        raise HeadError(f"ledger key {key[:20]!r} is not a raw Ed25519 public "
                        "key in hex") from None
    if pinned_key is not None and key != pinned_key:
        raise HeadError(f"its ledger is signed by a new key {found}, not the key "
                        f"{key_id(_public_key(pinned_key))} pinned at enrolment (a replaced "
                        "or re-signed ledger; if the silo's key really changed, re-register "
                        "it with `silotune coordinator register-silo --ledger-key`)")
    if pinned_key is None and last is not None and key != last.key:
        raise HeadError(f"its ledger is signed by a new key {found}, not the key "
                        f"{last.key_id} first seen for it (trust on first use; pin the right "
                        "key with `silotune coordinator register-silo --ledger-key`)")


def _public_key(hex_key: str) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))


@dataclass(frozen=True)
class HeadBook:
    """The last accepted head of each silo (JSON: silo -> `Head.to_json`)."""

    heads: Mapping[str, Head] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", MappingProxyType(dict(self.heads)))

    def since(self, silo: str) -> int | None:
        """The seq a request names as the last acknowledged head (None: no head yet)."""
        head = self.heads.get(silo)
        return None if head is None else head.seq

    def get(self, silo: str) -> Head | None:
        return self.heads.get(silo)

    def with_head(self, silo: str, head: Head) -> HeadBook:
        return HeadBook({**self.heads, silo: head})

    def merged(self, other: HeadBook) -> HeadBook:
        """Per silo, the newer of the two heads (another run may have seen a later one)."""
        heads = dict(self.heads)
        for silo, head in other.heads.items():
            if silo not in heads or head.seq > heads[silo].seq:
                heads[silo] = head
        return HeadBook(heads)

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {s: h.to_json() for s, h in sorted(self.heads.items())}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> HeadBook:
        try:
            return cls({str(s): Head.from_json(h) for s, h in (data or {}).items()})
        except (KeyError, TypeError, ValueError) as err:
            raise HeadError(f"malformed ledger heads record: {err!r}") from err


@contextlib.contextmanager
def shared_book(path: Path) -> Iterator[list[HeadBook]]:
    """The coordinator's book for all its runs, under an exclusive lock (runs may share
    it concurrently); what the caller leaves in the one-item list is written back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            book = [HeadBook.from_json(json.loads(path.read_text())) if path.exists()
                    else HeadBook()]
        except ValueError as err:
            raise HeadError(f"ledger heads file {path}: {err}; restore it from the runs' "
                            "metrics.json (ledger_heads)") from err
        before = book[0]
        yield book
        if book[0] != before:
            atomic_write_json(path, book[0].to_json())
    finally:
        os.close(fd)


def shared_book_path() -> Path | None:
    """The path `HEADS_ENV` names (a deployed coordinator), or None (a simulation)."""
    path = os.environ.get(HEADS_ENV)
    return Path(path) if path else None
