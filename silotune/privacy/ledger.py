"""Tamper-evident, append-only privacy ledger (JSON lines, hash chain, Ed25519 signatures).

One ledger per silo and dataset: the privacy budget belongs to the dataset, so every
train round appends its *cumulative* ``accounting_history`` and epsilon. Design per the
project's privacy recipe (``docs/privacy.md`` §6): ``entry_hash = sha256(canonical(body))``
over every field except ``entry_hash``/``signature``; ``prev_hash`` chains the entries;
the silo's Ed25519 key (RFC 8032) signs the raw hash bytes; JSONL written with ``O_APPEND``
and ``fsync`` per entry. ``verify_ledger`` re-checks the chain and signatures and recomputes
epsilon independently from the stored history (PRV: Gopi et al. 2021; RDP: Mironov 2017).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from silotune.privacy.accounting import AccountingStep, compute_epsilon, compute_epsilon_rdp
from silotune.privacy.client_level import check_client_level_entry
from silotune.privacy.feedback import check_feedback_entry
from silotune.privacy.one_run_audit import check_audit_entry

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
# Entry kinds whose DP release is composed into the cumulative accounting_history: DP-SGD
# training and DP importance scoring (FedPipe).
ACCOUNTED = ("train", "importance")
_UNHASHED = ("entry_hash", "signature")
_RESERVED = ("seq", "prev_hash", "ts", "signer_key_id", "signer_public_key", *_UNHASHED)
_REL_TOL = 1e-6


class LedgerError(ValueError):
    """The ledger file is unreadable or its tail is inconsistent."""


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces, UTF-8, NaN/inf rejected)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def compute_entry_hash(entry: Mapping[str, Any]) -> str:
    """``sha256(canonical(entry without entry_hash/signature)).hexdigest()``."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k not in _UNHASHED}))\
        .hexdigest()


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex characters of sha256 of the raw 32-byte public key."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def public_key_hex(signing_key: Ed25519PrivateKey) -> str:
    """The raw public key of `signing_key` in hex (a ledger's ``signer_public_key``)."""
    return _raw(signing_key.public_key()).hex()


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load the silo's Ed25519 key (PKCS#8 PEM), creating it once with mode 0600."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)  # unique per thread and process; mode 0600 from mkstemp
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            with contextlib.suppress(FileExistsError):  # another process won the race
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        log.warning("signing key %s is readable by group/others; chmod 600 it", path)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
    return key


def uncommitted_tail(path: Path) -> int:
    """Bytes after the last newline: an entry whose write never completed (a crash or a
    full disk mid-append). It was never committed; readers ignore it, the next append
    removes it, and `verify_ledger` reports it."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    return len(data) - (data.rfind(b"\n") + 1)


def read_entries(path: Path, *, skip_bad: bool = False) -> list[dict[str, Any]]:
    """The ledger's committed entries in file order (none for a missing file).

    A line that is not a JSON object raises `LedgerError` naming the file and line, or,
    with `skip_bad` (the audit's summary, which `verify_ledger` complements), is skipped.
    A last line without its newline is an uncommitted entry and is not read.
    """
    if not path.exists():
        return []
    entries = []
    with path.open(encoding="utf-8", errors="replace" if skip_bad else "strict") as f:
        for n, line in enumerate(f, start=1):
            if not line.endswith("\n"):
                log.warning("%s: line %d was never committed (no newline); ignored", path, n)
                break
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                if skip_bad:
                    continue
                raise LedgerError(f"{path}: line {n}: corrupt ledger entry (invalid JSON: "
                                  f"{exc.msg}); restore the file, do not edit it") from exc
            if not isinstance(entry, dict):
                if skip_bad:
                    continue
                raise LedgerError(f"{path}: line {n}: ledger entry is not a JSON object")
            entries.append(entry)
    return entries


def chain_links(entries: list[dict[str, Any]], since: int | None) -> list[list[Any]]:
    """``[seq, prev_hash, entry_hash, signature]`` of each entry after seq `since` (the head
    the coordinator last acknowledged; at least the newest entry): what a reply carries so
    the coordinator can check that the ledger extends that head (docs/privacy.md §6). The
    entries stay home: they cover private fields (the dataset size and fingerprint)."""
    newer = [e for e in entries if since is None or e.get("seq", -1) > since] or entries[-1:]
    return [[e["seq"], e["prev_hash"], e["entry_hash"], e["signature"]] for e in newer]


def _write_all(fd: int, data: bytes, committed: int) -> None:
    """Write and fsync one entry; on any failure (a full disk) put the file back to its
    committed length, so the ledger never holds half an entry."""
    try:
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, committed)
            os.fsync(fd)
        raise


class Ledger:
    """Append-only JSONL privacy ledger signed with ``signing_key``."""

    def __init__(self, path: Path, signing_key: Ed25519PrivateKey) -> None:
        self.path = Path(path)
        self._key = signing_key
        self._pub_hex = public_key_hex(signing_key)
        self._key_id = key_id(signing_key.public_key())

    def entries(self) -> list[dict[str, Any]]:
        """All entries in file order (``LedgerError`` names the file and line if corrupt)."""
        return read_entries(self.path)

    @property
    def public_key_hex(self) -> str:
        """The raw Ed25519 public key of this ledger's signer, in hex: what the silo's
        admin sends the coordinator's operator at enrolment (``--ledger-key``)."""
        return self._pub_hex

    @property
    def head_hash(self) -> str:
        """``entry_hash`` of the last entry, or 64 zeros for an empty ledger."""
        entries = self.entries()
        return str(entries[-1]["entry_hash"]) if entries else GENESIS_HASH

    def append(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Add ``seq``, ``prev_hash``, ``ts``, signer fields, hash and signature; write; fsync."""
        clash = sorted(set(body) & set(_RESERVED))
        if clash:
            raise ValueError(f"ledger body must not set reserved fields {clash}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time: seq/prev_hash stay a chain
            committed = os.fstat(fd).st_size - uncommitted_tail(self.path)
            if committed < os.fstat(fd).st_size:  # a write that never completed: drop it
                log.warning("%s: discarding an uncommitted last line", self.path)
                os.ftruncate(fd, committed)
            entries = self.entries()
            if entries and compute_entry_hash(entries[-1]) != entries[-1].get("entry_hash"):
                raise LedgerError(f"{self.path}: last entry fails its hash check; refusing to "
                                  "append (run verify_ledger)")
            entry = dict(body)
            entry.update(seq=len(entries),
                         prev_hash=entries[-1]["entry_hash"] if entries else GENESIS_HASH,
                         ts=datetime.now(UTC).isoformat(), signer_key_id=self._key_id,
                         signer_public_key=self._pub_hex)
            try:
                entry["entry_hash"] = compute_entry_hash(entry)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"ledger entry is not plain finite JSON: {exc}") from exc
            entry["signature"] = self._key.sign(bytes.fromhex(entry["entry_hash"])).hex()
            _write_all(fd, canonical(entry) + b"\n", committed)
        finally:
            os.close(fd)  # also releases the lock
        return entry

    def accounting_history(self) -> list[AccountingStep]:
        """Cumulative history stored in the last entry that carries ``accounting_history``."""
        for entry in reversed(self.entries()):
            if "accounting_history" in entry:
                return [AccountingStep.from_dict(d) for d in entry["accounting_history"]]
        return []


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=1e-12)


def _extends(old: list[AccountingStep], new: list[AccountingStep]) -> bool:
    """True if ``new`` is ``old`` plus more steps (consecutive equal segments merged)."""
    def merged(h: list[AccountingStep]) -> list[list[Any]]:
        out: list[list[Any]] = []
        for s in h:
            if out and out[-1][:2] == [s.noise_multiplier, s.sample_rate]:
                out[-1][2] += s.steps
            elif s.steps:
                out.append([s.noise_multiplier, s.sample_rate, s.steps])
        return out
    o, n = merged(old), merged(new)
    if not o:
        return True
    k = len(o) - 1
    return len(n) > k and o[:k] == n[:k] and o[k][:2] == n[k][:2] and o[k][2] <= n[k][2]


def _check_train(e: dict[str, Any], label: str, state: dict[Any, tuple[str, float, list[Any]]],
                 problems: list[str]) -> None:
    missing = [f for f in ("accounting_history", "delta", "epsilon", "accountant") if f not in e]
    if missing:
        problems.append(f"{label}: fields {missing}: missing from train entry")
        return
    try:
        history = [AccountingStep.from_dict(d) for d in e["accounting_history"]]
        delta, eps = float(e["delta"]), float(e["epsilon"])
    except (TypeError, ValueError) as exc:
        problems.append(f"{label}: accounting_history/delta/epsilon: unreadable ({exc})")
        return
    rdp = compute_epsilon_rdp(history, delta)
    checks = e.get("eps_cross_check")
    stored_rdp = checks.get("rdp") if isinstance(checks, dict) else None
    if stored_rdp is not None and not _close(float(stored_rdp), rdp):
        problems.append(f"{label}: eps_cross_check.rdp: stored {stored_rdp} but RDP "
                        f"recomputation from accounting_history gives {rdp}")
    if e["accountant"] == "prv":
        report = compute_epsilon(history, delta, cross_check=False)
        recomputed = report.epsilon if report.accountant == "prv" else math.nan  # PRV failed
    elif e["accountant"] == "rdp":
        recomputed = rdp
    else:
        recomputed = math.nan
    if not _close(eps, recomputed):
        problems.append(f"{label}: epsilon: stored {eps} but {e['accountant']} recomputation "
                        f"from accounting_history gives {recomputed}")
    limit = e.get("epsilon_limit")
    if limit is not None and eps > float(limit) + 1e-9:
        problems.append(f"{label}: epsilon: {eps} exceeds epsilon_limit {limit}")
    ds = e.get("dataset_fingerprint")
    if ds in state:
        prev_label, prev_eps, prev_hist = state[ds]
        if eps < prev_eps - 1e-9:
            problems.append(f"{label}: epsilon: eps decreased from {prev_eps} ({prev_label}) "
                            f"to {eps}")
        if not _extends(prev_hist, history):
            problems.append(f"{label}: accounting_history: does not extend the history of "
                            f"{prev_label} (steps dropped or rewritten)")
        grown = sum(s.steps for s in history) - sum(s.steps for s in prev_hist)
        if "steps_this_entry" in e and e["steps_this_entry"] != grown:
            problems.append(f"{label}: steps_this_entry: {e['steps_this_entry']} but the "
                            f"history grew by {grown} steps since {prev_label}")
    state[ds] = (label, eps, history)


# Fields of an accounted entry that are the silo's privacy policy: a change between
# entries is reported, naming the entry (an auditor must see every loosening).
POLICY_FIELDS = ("delta", "epsilon_limit", "accountant", "privacy_unit",
                 "neighboring_relation")


def _check_policy(e: Mapping[str, Any], label: str, seen: dict[str, tuple[str, Any]],
                  problems: list[str]) -> None:
    for name in POLICY_FIELDS:
        if name not in e:
            continue
        if name in seen and seen[name][1] != e[name]:
            first, value = seen[name]
            problems.append(f"{label}: {name}: changed from {value!r} ({first}) to "
                            f"{e[name]!r}: a change of the silo's privacy policy")
        seen[name] = (label, e[name])


def verify_ledger(path: Path, public_key: Ed25519PublicKey | None = None) -> list[str]:
    """Check a ledger; return problems (empty list = OK), each naming the seq and field.

    Checks seq order, the ``prev_hash`` chain, ``entry_hash`` recomputation, the Ed25519
    signature (against ``public_key`` if given, which must then match ``signer_public_key``),
    and for ``type == "train"`` entries: epsilon recomputed from ``accounting_history``
    (PRV or RDP per ``accountant``, within 1e-6 relative), the stored RDP cross-check,
    epsilon never decreasing, epsilon <= ``epsilon_limit`` and histories only growing;
    for ``type == "feedback"`` entries (CrossLM), `check_feedback_entry`;
    for ``audit`` entries (empirical one-run audits) the bound recomputed from its counts
    and never above the accounted epsilon; for ``client_level`` entries (the coordinator's
    ledger) epsilon recomputed from (z, N, k, releases) and releases counting up. A change
    of delta, epsilon limit, accountant, privacy unit or adjacency between accounted
    entries, and an uncommitted last line, are reported too.
    """
    path = Path(path)
    if not path.exists():
        return [f"{path}: ledger file does not exist"]
    try:
        entries = read_entries(path)
    except LedgerError as exc:
        return [str(exc)]
    problems: list[str] = []
    tail = uncommitted_tail(path)
    if tail:
        problems.append(f"line {len(entries) + 1} (uncommitted): {tail} bytes without a "
                        "newline, a write that never completed; the silo discards it at "
                        "its next append")
    state: dict[Any, tuple[str, float, list[Any]]] = {}
    policy: dict[str, tuple[str, Any]] = {}
    last_train: dict[str, Any] | None = None
    last_client_level: dict[str, Any] | None = None
    prev = GENESIS_HASH
    for i, e in enumerate(entries):
        label = f"seq {e.get('seq', f'? (line {i + 1})')}"
        if e.get("seq") != i:
            problems.append(f"{label}: seq: expected {i} (entries missing, added or reordered)")
        if e.get("prev_hash") != prev:
            problems.append(f"{label}: prev_hash: does not match the previous entry's "
                            f"entry_hash (chain broken)")
        try:
            recomputed = compute_entry_hash(e)
        except (TypeError, ValueError) as exc:
            recomputed = f"<not canonical JSON: {exc}>"
        if recomputed != e.get("entry_hash"):
            problems.append(f"{label}: entry_hash: hash mismatch (content changed after signing)")
        prev = str(e.get("entry_hash"))
        try:
            signer = Ed25519PublicKey.from_public_bytes(bytes.fromhex(e["signer_public_key"]))
        except (KeyError, TypeError, ValueError):
            problems.append(f"{label}: signer_public_key: missing or not a raw Ed25519 key")
            continue
        if public_key is not None and _raw(public_key) != _raw(signer):
            problems.append(f"{label}: signer_public_key: key {key_id(signer)} is not the "
                            f"expected key {key_id(public_key)}")
        if e.get("signer_key_id") != key_id(signer):
            problems.append(f"{label}: signer_key_id: does not match signer_public_key")
        try:
            (public_key or signer).verify(bytes.fromhex(e["signature"]),
                                          bytes.fromhex(e["entry_hash"]))
        except (KeyError, TypeError, ValueError, InvalidSignature):
            problems.append(f"{label}: signature: invalid signature over entry_hash")
        kind = e.get("type")
        try:
            if kind in ACCOUNTED:  # DP releases charged to the cumulative epsilon
                _check_train(e, label, state, problems)
                _check_policy(e, label, policy, problems)
            elif kind == "feedback":  # CrossLM: a post-processing release, 0 epsilon
                check_feedback_entry(e, label, last_train, problems)
            elif kind == "audit":
                problems += [f"{label}: {p}" for p in check_audit_entry(e)]
            elif kind == "client_level":
                problems += [f"{label}: {p}"
                             for p in check_client_level_entry(e, last_client_level)]
                last_client_level = e
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{label}: {kind} fields: malformed ({exc!r})")
        if kind == "train":
            last_train = e
    return problems
