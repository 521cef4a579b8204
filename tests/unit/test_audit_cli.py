"""`silotune audit`: honest ledgers pass; every kind of tampering fails naming seq and field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from silotune.cli import main
from silotune.client.silo import SiloPrivacy, SiloPrivacyConfig
from silotune.privacy.accounting import AccountingStep, compute_epsilon
from silotune.privacy.audit import (
    KeyFileError,
    audit_ledger,
    export_public_key,
    independent_check,
    load_public_key,
)
from silotune.privacy.ledger import (
    Ledger,
    canonical,
    compute_entry_hash,
    load_or_create_signing_key,
)

FRAME = pd.DataFrame({"text": ["a b", "c d", "e f"], "label": ["x", "y", "x"]})
STEP = AccountingStep(1.0, 0.01, 100)
RESERVED = ("seq", "prev_hash", "ts", "signer_key_id", "signer_public_key", "entry_hash",
            "signature")


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    """A silo folder with key.pem and a 3-round ledger.jsonl, built once (PRV is slow-ish)."""
    root = tmp_path_factory.mktemp("silo")
    silo = SiloPrivacy(SiloPrivacyConfig(
        silo_id="silo-0", target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0,
        ledger_path=root / "ledger.jsonl", key_path=root / "key.pem"))
    for round_ in (1, 2, 3):
        silo.record_round(step=STEP, run_id="run-1", round_=round_, frame=FRAME, liveness=0.1)
    return root


@pytest.fixture
def silo_dir(tmp_path: Path, honest: Path) -> Path:
    shutil.copytree(honest, tmp_path / "silo")
    return tmp_path / "silo"


def _run(capsys, *argv: Any) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _entries(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(canonical(e) + b"\n" for e in entries))


def test_honest_ledger_passes(capsys, silo_dir):
    code, text = _run(capsys, "audit", silo_dir / "ledger.jsonl")
    assert code == 0, text
    header, row = text.splitlines()[:2]
    assert "PLD check" in header and "status" in header
    assert row.startswith("silo-0") and row.rstrip().endswith("OK")
    assert "1.0782 / 8" in row and "ok (PLD 1.06" in row and "prv" in row
    assert "problems" not in text and "1 of 1 ledger(s) OK" in text


def test_lowered_epsilon_names_seq_and_field(capsys, silo_dir):
    path = silo_dir / "ledger.jsonl"
    entries = _entries(path)
    entries[1]["epsilon"] = 0.5
    _write(path, entries)
    code, text = _run(capsys, "audit", path)
    assert code == 1 and "FAILED" in text
    assert f"{path}: seq 1: entry_hash: hash mismatch" in text
    assert f"{path}: seq 1: epsilon: stored 0.5" in text
    assert "seq 2: epsilon: eps decreased" not in text  # 0.5 -> 1.08 grows; seq 1 is the liar


def test_rehashed_lowered_epsilon_still_fails(capsys, silo_dir):
    """A tamperer who recomputes the hash still breaks the signature and the chain."""
    path = silo_dir / "ledger.jsonl"
    entries = _entries(path)
    entries[2]["epsilon"] = 0.8
    entries[2]["entry_hash"] = compute_entry_hash(entries[2])
    _write(path, entries)
    code, text = _run(capsys, "audit", path)
    assert code == 1
    assert "seq 2: signature: invalid signature" in text
    assert "seq 2: epsilon: eps decreased" in text
    # the final value no longer agrees with the independent PLD recomputation either
    assert "seq 2: epsilon: reported PRV epsilon 0.8 is below the independent" in text


def test_deleted_entry(capsys, silo_dir):
    path = silo_dir / "ledger.jsonl"
    entries = _entries(path)
    del entries[1]
    _write(path, entries)
    code, text = _run(capsys, "audit", path)
    assert code == 1
    assert "seq 2: seq: expected 1" in text and "seq 2: prev_hash:" in text


def test_swapped_entries(capsys, silo_dir):
    path = silo_dir / "ledger.jsonl"
    entries = _entries(path)
    entries[1], entries[2] = entries[2], entries[1]
    _write(path, entries)
    code, text = _run(capsys, "audit", path)
    assert code == 1
    assert "seq 2: seq: expected 1" in text and "seq 1: seq: expected 2" in text
    assert "seq 1: epsilon: eps decreased" in text


def test_appended_entry_signed_with_another_key(capsys, silo_dir, tmp_path):
    path = silo_dir / "ledger.jsonl"
    last = _entries(path)[-1]
    body = {k: v for k, v in last.items() if k not in RESERVED}
    history = [*[AccountingStep.from_dict(d) for d in last["accounting_history"]], STEP]
    report = compute_epsilon(history, 1e-5)
    body.update(round=4, accounting_history=[s.to_dict() for s in history],
                epsilon=report.epsilon, eps_cross_check=report.cross_check)
    Ledger(path, load_or_create_signing_key(tmp_path / "forger.pem")).append(body)
    code, text = _run(capsys, "audit", path)
    assert code == 1
    assert "seq 3: signer_public_key: signed by a different key than seq 0" in text
    assert "seq 0:" not in text and "seq 2:" not in text


def test_public_key_pem_and_hex(capsys, silo_dir, tmp_path):
    path = silo_dir / "ledger.jsonl"
    pem = export_public_key(silo_dir / "key.pem", tmp_path / "silo-0.pub.pem")
    assert pem.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert _run(capsys, "audit", path, "--public-key", pem)[0] == 0
    hex_file = tmp_path / "silo-0.pub.hex"
    hex_file.write_text(_entries(path)[0]["signer_public_key"] + "\n")
    assert _run(capsys, "audit", path, "--public-key", hex_file)[0] == 0


def test_wrong_public_key(capsys, silo_dir, tmp_path):
    other = tmp_path / "other.pem"
    load_or_create_signing_key(other)  # another silo's key
    pub = export_public_key(other, tmp_path / "other.pub.pem")
    code, text = _run(capsys, "audit", silo_dir / "ledger.jsonl", "--public-key", pub)
    assert code == 1
    for seq in (0, 1, 2):
        assert f"seq {seq}: signer_public_key: key " in text
        assert f"seq {seq}: signature: invalid signature" in text


def test_unreadable_public_key_is_a_usage_error(capsys, silo_dir, tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    code, text = _run(capsys, "audit", silo_dir / "ledger.jsonl", "--public-key", bad)
    assert code == 2 and "bad.pub" in text and "not an Ed25519 public key" in text
    code, text = _run(capsys, "audit", silo_dir / "ledger.jsonl", "--public-key",
                      silo_dir / "key.pem")
    assert code == 2 and "PRIVATE key" in text
    with pytest.raises(KeyFileError, match="cannot read public key"):
        load_public_key(tmp_path / "absent.pem")


def test_json_output(capsys, silo_dir, tmp_path):
    good = silo_dir / "ledger.jsonl"
    bad = tmp_path / "bad.jsonl"
    entries = _entries(good)
    entries[1]["epsilon"] = 0.5
    _write(bad, entries)
    code, text = _run(capsys, "audit", "--json", good, bad)
    assert code == 1
    data = json.loads(text)
    assert [d["ok"] for d in data] == [True, False]
    assert data[0]["problems"] == [] and data[0]["epsilon"] == pytest.approx(1.0782, abs=2e-3)
    assert data[0]["independent"]["pld"] == pytest.approx(1.0681, abs=2e-3)
    assert data[0]["history"][-1][0] == 3 and data[0]["accountant"] == "prv"
    assert any(p.startswith("seq 1: entry_hash") for p in data[1]["problems"])
    json.dumps(data, allow_nan=False)


def test_plot_writes_png(capsys, silo_dir, tmp_path):
    out = tmp_path / "eps.png"
    code, text = _run(capsys, "audit", silo_dir / "ledger.jsonl", "--plot", out)
    assert code == 0 and f"wrote {out}" in text
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_ledger_is_named(capsys, silo_dir, tmp_path):
    missing = tmp_path / "nope.jsonl"
    code, text = _run(capsys, "audit", silo_dir / "ledger.jsonl", missing)
    assert code == 1 and f"{missing}: ledger file not found" in text
    assert "1 of 2 ledger(s) OK" in text


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["audit"])
    assert exit_info.value.code == 2


def test_audit_ledger_api(silo_dir):
    audit = audit_ledger(silo_dir / "ledger.jsonl")
    assert audit.ok and audit.silo_id == "silo-0" and audit.entries == audit.train_entries == 3
    assert audit.epsilon_limit == 8.0 and audit.delta == 1e-5 and audit.cross_check_ok
    assert [r for r, _ in audit.history] == [1, 2, 3]
    assert [e for _, e in audit.history] == pytest.approx([0.7281, 0.9226, 1.0782], abs=2e-3)


def test_pld_agrees_within_2_percent_on_a_100_round_run():
    """Acceptance: epsilon agrees with PLD within 2 % on a 100-round run."""
    history = [AccountingStep(1.0, 0.01, 50)] * 100  # merged into one 5000-step segment
    reported = compute_epsilon(history, 1e-5, cross_check=False)
    assert reported.accountant == "prv"
    values, problem = independent_check(history, 1e-5, reported.epsilon, "prv")
    assert problem is None
    assert abs(reported.epsilon - values["pld"]) <= 0.02 * values["pld"]
    assert values["rdp"] >= values["pld"]
    _, problem = independent_check(history, 1e-5, 0.95 * values["pld"], "prv")
    assert problem is not None and problem.startswith("epsilon: reported PRV epsilon")
    # an RDP-fallback value must sit between PLD and RDP
    assert independent_check(history, 1e-5, values["rdp"], "rdp")[1] is None
    assert "under-reported" in str(independent_check(history, 1e-5, 0.9 * values["pld"],
                                                     "rdp")[1])
