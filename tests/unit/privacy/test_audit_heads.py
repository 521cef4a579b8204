"""`silotune audit --heads metrics.json`: a ledger is checked against every head its
coordinator recorded (truncated, rolled back, re-signed), and the verdict names the key
it trusted; `--strict` fails a key that is not pinned. The record is built as the
coordinator builds it (silotune/server/heads.py) from a real silo's ledger."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from silotune.cli import main
from silotune.client.silo import SiloPrivacy, SiloPrivacyConfig
from silotune.privacy.accounting import AccountingStep
from silotune.privacy.ledger import Ledger, chain_links, load_or_create_signing_key, read_entries
from silotune.server.heads import Head, HeadBook, check_chain

FRAME = pd.DataFrame({"text": ["a b", "c d", "e f"], "label": ["x", "y", "x"]})
STEP = AccountingStep(1.0, 0.01, 100)
SILO = "silo-0"


def _silo(root: Path) -> SiloPrivacy:
    return SiloPrivacy(SiloPrivacyConfig(
        silo_id=SILO, target_epsilon=8.0, delta=1e-5, max_grad_norm=1.0,
        ledger_path=root / "ledger.jsonl", key_path=root / "key.pem"))


def _metrics(ledger: Ledger, pinned: bool) -> dict[str, Any]:
    """A run's metrics.json as its coordinator writes it: one head per round."""
    book, rows, last = HeadBook(), [], None
    for round_, entry in enumerate(ledger.entries(), start=1):
        entries = [e for e in ledger.entries() if e["seq"] <= entry["seq"]]
        chain = chain_links(entries, None if last is None else last.seq)
        last = check_chain(last, chain, chain[-1][2], ledger.public_key_hex,
                           ledger.public_key_hex if pinned else None)
        book = book.with_head(SILO, last)
        rows.append({"round": round_, "ledger_heads": {
            SILO: {"seq": last.seq, "entry_hash": last.entry_hash}}})
    return {"rounds": rows, "ledger_heads": book.to_json()}


@pytest.fixture(scope="module")
def honest(tmp_path_factory) -> Path:
    """A silo folder with a 3-round ledger, its copy after round 2, and the metrics.json
    of a coordinator that pinned its key (pinned.json) or trusted it on first use."""
    root = tmp_path_factory.mktemp("silo")
    silo = _silo(root)
    for round_ in (1, 2, 3):
        silo.record_round(step=STEP, run_id="run-1", round_=round_, frame=FRAME)
        if round_ == 2:
            shutil.copy(root / "ledger.jsonl", root / "after-round-2.jsonl")
    for name, pinned in (("pinned.json", True), ("tofu.json", False)):
        (root / name).write_text(json.dumps(_metrics(silo.ledger, pinned)))
    return root


@pytest.fixture
def silo_dir(tmp_path: Path, honest: Path) -> Path:
    shutil.copytree(honest, tmp_path / "silo")
    return tmp_path / "silo"


def _audit(capsys, silo_dir: Path, metrics: str | None, *flags: str) -> tuple[int, str]:
    argv = [str(silo_dir / "ledger.jsonl"), *flags]
    if metrics is not None:
        argv += ["--heads", str(silo_dir / metrics)]
    code = main(["audit", *argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_an_honest_ledger_passes_and_the_verdict_names_the_key(capsys, silo_dir):
    code, text = _audit(capsys, silo_dir, "pinned.json", "--strict")
    assert code == 0, text
    assert "pinned at enrolment (the coordinator's registry); 3 coordinator-recorded " \
           "head(s) checked" in text
    code, text = _audit(capsys, silo_dir, "tofu.json")
    assert code == 0, text
    assert "NOT pinned: trusted on first use by the coordinator" in text
    code, text = _audit(capsys, silo_dir, None)
    assert code == 0 and "NOT pinned: the key that signed seq 0" in text, text


@pytest.mark.parametrize("metrics", ["tofu.json", None])
def test_strict_fails_a_key_that_is_not_pinned(capsys, silo_dir, metrics):
    code, text = _audit(capsys, silo_dir, metrics, "--strict")
    assert code == 1, text
    assert "key: NOT pinned" in text and "--strict needs a key pinned at enrolment" in text
    key = silo_dir / "silo.pub"  # the auditor's own copy of the key pins it
    key.write_text(read_entries(silo_dir / "ledger.jsonl")[0]["signer_public_key"])
    code, text = _audit(capsys, silo_dir, metrics, "--strict", "--public-key", str(key))
    assert code == 0 and "given by the auditor (--public-key)" in text, text


def test_a_truncated_ledger_fails_naming_the_missing_head(capsys, silo_dir):
    ledger = silo_dir / "ledger.jsonl"
    ledger.write_bytes(b"".join(ledger.read_bytes().splitlines(keepends=True)[:2]))
    code, text = _audit(capsys, silo_dir, "pinned.json")
    assert code == 1, text
    assert "seq 2: missing: the coordinator recorded head seq 2" in text
    assert "but the ledger ends at seq 1 (truncated or rolled back)" in text


def test_a_rolled_back_ledger_fails_naming_the_rewritten_entry(capsys, silo_dir):
    ledger = silo_dir / "ledger.jsonl"
    shutil.copy(silo_dir / "after-round-2.jsonl", ledger)  # round 3's spend erased ...
    _silo(silo_dir).record_round(step=STEP, run_id="run-2", round_=1, frame=FRAME)  # ...
    code, text = _audit(capsys, silo_dir, "pinned.json")  # ... and the ledger regrown
    assert code == 1, text
    assert "seq 2: entry_hash: " in text
    assert "is not the head the coordinator recorded" in text and "round 3" in text
    assert "the ledger was rolled back or forked" in text


def test_a_ledger_re_signed_with_a_new_key_fails(capsys, silo_dir):
    ledger = silo_dir / "ledger.jsonl"
    bodies = [{k: v for k, v in e.items() if k not in (
        "seq", "prev_hash", "ts", "signer_key_id", "signer_public_key", "entry_hash",
        "signature")} for e in read_entries(ledger)]
    ledger.unlink()
    forged = Ledger(ledger, load_or_create_signing_key(silo_dir / "new-key.pem"))
    for body in bodies:  # the same entries, re-chained and re-signed with a fresh key
        forged.append(body)
    code, text = _audit(capsys, silo_dir, "tofu.json")
    assert code == 1, text
    assert "seq 0: signer_public_key: key" in text and "is not the expected key" in text
    assert "seq 2: entry_hash: " in text  # the recorded heads are gone too


def test_a_silo_without_a_record_and_an_unreadable_record_fail(capsys, silo_dir):
    metrics = json.loads((silo_dir / "pinned.json").read_text())
    metrics["ledger_heads"] = {"other": metrics["ledger_heads"][SILO]}
    (silo_dir / "other.json").write_text(json.dumps(metrics))
    code, text = _audit(capsys, silo_dir, "other.json")
    assert code == 1 and "recorded no ledger head for silo 'silo-0'" in text, text
    (silo_dir / "old.json").write_text(json.dumps({"rounds": []}))
    code, text = _audit(capsys, silo_dir, "old.json")
    assert code == 2 and "no readable ledger_heads" in text, text


def test_the_record_is_what_the_coordinator_keeps(honest):
    record = json.loads((honest / "pinned.json").read_text())["ledger_heads"][SILO]
    head = Head.from_json(record)
    assert head.seq == 2 and head.pinned and record["key_id"] == head.key_id
