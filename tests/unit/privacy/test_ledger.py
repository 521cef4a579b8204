"""Ledger: hash chain, Ed25519 signatures, recomputed epsilon, tampering (docs/privacy.md §6)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from silotune.privacy.accounting import AccountingStep, compute_epsilon
from silotune.privacy.ledger import (
    GENESIS_HASH,
    Ledger,
    LedgerError,
    canonical,
    compute_entry_hash,
    key_id,
    load_or_create_signing_key,
    verify_ledger,
)
from silotune.privacy.one_run_audit import epsilon_lower_bound

DELTA = 1e-5
ROUND = AccountingStep(1.0, 0.01, 100)


def train_body(history: list[AccountingStep], rnd: int) -> dict[str, Any]:
    rep = compute_epsilon(history, DELTA)
    return {
        "type": "train", "silo_id": "silo-0", "dataset_fingerprint": "ab" * 32,
        "dataset_size": 10_000, "privacy_unit": "example",
        "mechanism": "poisson-subsampled-gaussian", "noise_multiplier": 1.0,
        "max_grad_norm": 1.0, "sample_rate": 0.01, "steps_this_entry": ROUND.steps,
        "round": rnd, "run_id": "run-1",
        "accounting_history": [s.to_dict() for s in history], "delta": DELTA,
        "epsilon": rep.epsilon, "accountant": rep.accountant, "eps_cross_check": rep.cross_check,
        "epsilon_limit": 8.0, "remaining": 8.0 - rep.epsilon, "liveness": 0.01,
        "secure_mode": False,
    }


@pytest.fixture(scope="module")
def bodies() -> list[dict[str, Any]]:
    return [train_body([ROUND] * r, r) for r in (1, 2, 3)]


@pytest.fixture
def ledger(tmp_path: Path, bodies: list[dict[str, Any]]) -> tuple[Ledger, Ed25519PrivateKey]:
    key = load_or_create_signing_key(tmp_path / "keys" / "silo.pem")
    led = Ledger(tmp_path / "ledger.jsonl", key)
    for b in bodies:
        led.append(b)
    return led, key


def write_lines(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(canonical(e) + b"\n" for e in entries))


def test_canonical_bytes() -> None:
    assert canonical({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()
    with pytest.raises(ValueError):
        canonical({"x": float("nan")})


def test_key_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "silo.pem"
    k1 = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    k2 = load_or_create_signing_key(path)
    assert key_id(k1.public_key()) == key_id(k2.public_key())
    assert len(key_id(k1.public_key())) == 16
    assert list(path.parent.iterdir()) == [path]  # no temp files left behind


def test_honest_ledger_verifies(ledger: tuple[Ledger, Ed25519PrivateKey],
                                bodies: list[dict[str, Any]]) -> None:
    led, key = ledger
    entries = led.entries()
    assert [e["seq"] for e in entries] == [0, 1, 2]
    assert entries[0]["prev_hash"] == GENESIS_HASH
    assert entries[1]["prev_hash"] == entries[0]["entry_hash"] and led.head_hash == \
        entries[2]["entry_hash"]
    assert entries[0]["signer_key_id"] == key_id(key.public_key())
    assert [e["epsilon"] for e in entries] == pytest.approx([0.7281, 0.9226, 1.0782], abs=2e-3)
    assert led.accounting_history() == [ROUND] * 3
    assert verify_ledger(led.path) == []
    assert verify_ledger(led.path, key.public_key()) == []
    assert bodies[0].get("seq") is None  # the caller's dict is not mutated


def test_non_train_entries_and_history_lookup(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.jsonl", Ed25519PrivateKey.generate())
    assert led.entries() == [] and led.accounting_history() == []
    assert led.head_hash == GENESIS_HASH
    led.append(train_body([ROUND], 1))
    audit = {"type": "audit", "m": 1000, "r": 100, "v": 90, "delta": 1e-5,
             "significance": 0.05, "k_grid_size": 1, "eps_lower_bound": 1.626,
             "noise_multiplier": 0.0, "sample_rate": 0.01, "steps": 10, "eps_accounted": None}
    audit["eps_lower_bound"] = epsilon_lower_bound(m=1000, r=100, v=90, delta=1e-5)
    led.append(audit)  # audit entries are verified too (bound recomputed from its counts)
    assert led.accounting_history() == [ROUND]
    assert verify_ledger(led.path) == []
    with pytest.raises(ValueError, match="reserved"):
        led.append({"type": "audit", "seq": 5})


def test_lowered_epsilon_is_caught(ledger: tuple[Ledger, Ed25519PrivateKey]) -> None:
    led, _ = ledger
    entries = led.entries()
    entries[1]["epsilon"] = 0.5
    write_lines(led.path, entries)
    problems = verify_ledger(led.path)
    assert any(p.startswith("seq 1:") and "hash mismatch" in p for p in problems), problems
    assert any(p.startswith("seq 1:") and "eps decreased" in p for p in problems), problems
    assert any(p.startswith("seq 1: epsilon: stored 0.5") for p in problems), problems
    assert not any(p.startswith(("seq 0", "seq 2")) and "hash mismatch" in p for p in problems)


def test_resigned_forgery_still_caught(ledger: tuple[Ledger, Ed25519PrivateKey]) -> None:
    """Even with the hash recomputed (but no key), the signature and chain break."""
    led, _ = ledger
    entries = led.entries()
    entries[1]["epsilon"] = 0.5
    entries[1]["entry_hash"] = compute_entry_hash(entries[1])
    write_lines(led.path, entries)
    problems = verify_ledger(led.path)
    assert any(p.startswith("seq 1: signature") for p in problems), problems
    assert any(p.startswith("seq 2: prev_hash") for p in problems), problems


def test_deleted_entry_is_caught(ledger: tuple[Ledger, Ed25519PrivateKey]) -> None:
    led, _ = ledger
    entries = led.entries()
    write_lines(led.path, [entries[0], entries[2]])
    problems = verify_ledger(led.path)
    assert any(p.startswith("seq 2: seq") for p in problems), problems
    assert any(p.startswith("seq 2: prev_hash") for p in problems), problems


def test_reordered_entries_are_caught(ledger: tuple[Ledger, Ed25519PrivateKey]) -> None:
    led, _ = ledger
    e = led.entries()
    write_lines(led.path, [e[0], e[2], e[1]])
    problems = verify_ledger(led.path)
    assert any(p.startswith("seq 2: seq") for p in problems), problems
    assert any("eps decreased" in p for p in problems), problems


def test_wrong_public_key_is_caught(ledger: tuple[Ledger, Ed25519PrivateKey]) -> None:
    led, _ = ledger
    other = Ed25519PrivateKey.generate().public_key()
    problems = verify_ledger(led.path, other)
    assert len([p for p in problems if "signer_public_key" in p]) == 3, problems
    assert len([p for p in problems if "invalid signature" in p]) == 3, problems


def test_over_limit_and_dropped_history_are_caught(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.jsonl", Ed25519PrivateKey.generate())
    led.append(train_body([ROUND] * 2, 1))
    over = train_body([ROUND] * 3, 2)
    over["epsilon_limit"] = 1.0
    led.append(over)
    merged = train_body([ROUND] * 4, 3)  # a merged history is still an extension
    merged["accounting_history"] = [AccountingStep(1.0, 0.01, 400).to_dict()]
    led.append(merged)
    led.append({**train_body([ROUND] * 2, 4), "accounting_history": [ROUND.to_dict()]})
    problems = verify_ledger(led.path)
    assert any(p.startswith("seq 1: epsilon") and "exceeds epsilon_limit" in p
               for p in problems), problems
    assert any(p.startswith("seq 3: accounting_history") for p in problems), problems
    assert not any(p.startswith(("seq 0", "seq 2")) and "privacy policy" not in p
                   for p in problems), problems
    assert any(p.startswith("seq 1: epsilon_limit: changed") for p in problems), problems


def test_corrupt_line_names_file_and_line(ledger: tuple[Ledger, Ed25519PrivateKey]) -> None:
    led, _ = ledger
    with led.path.open("a") as f:
        f.write('{"seq": 3, "broken\n')
    with pytest.raises(LedgerError, match=r"ledger\.jsonl: line 4"):
        led.entries()
    with pytest.raises(LedgerError, match="line 4"):
        led.append({"type": "audit"})
    assert "line 4" in verify_ledger(led.path)[0]


def test_append_refuses_tampered_tail(ledger: tuple[Ledger, Ed25519PrivateKey]) -> None:
    led, _ = ledger
    entries = led.entries()
    entries[-1]["epsilon"] = 0.1
    write_lines(led.path, entries)
    with pytest.raises(LedgerError, match="refusing to append"):
        led.append({"type": "audit"})


def test_file_is_jsonl_of_canonical_entries(ledger: tuple[Ledger, Ed25519PrivateKey]) -> None:
    led, _ = ledger
    lines = led.path.read_bytes().splitlines()
    assert len(lines) == 3
    assert all(canonical(json.loads(line)) == line for line in lines)


def test_an_uncommitted_last_line_is_ignored_reported_and_dropped_at_the_next_append(
        ledger: tuple[Ledger, Ed25519PrivateKey], bodies: list[dict[str, Any]]) -> None:
    led, _ = ledger
    committed = led.path.read_bytes()
    with led.path.open("ab") as f:
        f.write(canonical(train_body([ROUND] * 4, 4))[:57])  # a write cut short: no newline
    assert len(led.entries()) == 3  # never committed, never read
    assert any("uncommitted" in p for p in verify_ledger(led.path))
    led.append(train_body([ROUND] * 4, 4))
    assert led.path.read_bytes().startswith(committed) and len(led.entries()) == 4
    assert verify_ledger(led.path) == []


def test_a_policy_change_between_entries_is_flagged(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.jsonl", load_or_create_signing_key(tmp_path / "k.pem"))
    led.append(train_body([ROUND], 1))
    looser = train_body([ROUND] * 2, 2)
    looser.update(delta=1e-3, epsilon=compute_epsilon([ROUND] * 2, 1e-3).epsilon,
                  eps_cross_check=compute_epsilon([ROUND] * 2, 1e-3).cross_check)
    led.append(looser)
    problems = verify_ledger(led.path)
    assert any(p.startswith("seq 1: delta: changed from 1e-05 (seq 0) to 0.001")
               for p in problems), problems


@pytest.fixture
def small_filesystem(tmp_path: Path):
    """A 16 KiB tmpfs (root only; skipped where mounting is not allowed)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_mid_append_leaves_the_committed_ledger_and_nothing_is_lost(
        small_filesystem: Path) -> None:
    """The ledger lives on a 16 KiB filesystem; a filler file takes the rest, so the next
    append fails mid-write (ENOSPC). The file is put back to its committed entries; once
    space is freed the next append succeeds and the ledger verifies."""
    key = load_or_create_signing_key(small_filesystem / "key.pem")
    led = Ledger(small_filesystem / "ledger.jsonl", key)
    rounds, size = 0, 0
    while True:  # until the last page has less room than an entry: the next needs a page
        rounds += 1
        led.append(train_body([ROUND] * rounds, rounds))
        size, entry = led.path.stat().st_size, led.path.stat().st_size - size
        if 4096 - size % 4096 < entry:  # the next entry is at least as long as this one
            break
    committed = led.path.read_bytes()
    filler = small_filesystem / "filler"
    with filler.open("wb", buffering=0) as f:  # take every free page
        try:
            while True:
                f.write(b"x" * 512)
        except OSError:
            pass
    with pytest.raises(OSError):
        led.append(train_body([ROUND] * (rounds + 1), rounds + 1))
    assert led.path.read_bytes() == committed  # no half entry left behind
    filler.unlink()
    led.append(train_body([ROUND] * (rounds + 1), rounds + 1))
    assert len(led.entries()) == rounds + 1 and verify_ledger(led.path) == []
