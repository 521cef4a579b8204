"""Coordinator-kept ledger heads (silotune/server/heads.py): a reply is accepted only if
the silo's ledger extends the head the coordinator last accepted, signed by the pinned
key (or, without one, by the key first seen). Real ledgers, real signatures; the last
test drives the real ClientApp train handler."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.supercore.task_identity import TaskIdentity

from silotune.cli import main
from silotune.client.app import build_client_app
from silotune.client.local import LEDGER_KEY_FILE
from silotune.config import RunConfig
from silotune.privacy.ledger import (
    Ledger,
    chain_links,
    load_or_create_signing_key,
    public_key_hex,
)
from silotune.protocol.messages import TrainInstruction, TrainReply
from silotune.server import checkpoint
from silotune.server.heads import (
    Head,
    HeadBook,
    HeadError,
    check_chain,
    shared_book,
)
from silotune.server.registry import ledger_key_hex
from tests.unit.client.test_sovereign_silo import POLICY, _cfg, _context, _source, _train_msg

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def _ledger(path: Path, entries: int, key: Ed25519PrivateKey = KEY, tag: str = "") -> Ledger:
    ledger = Ledger(path, key)
    for n in range(entries):
        ledger.append({"type": "note", "n": f"{tag}{n}"})
    return ledger


def _reply(ledger: Ledger, since: int | None) -> dict:
    """The ledger fields of a reply to a request naming `since` (as the silo builds them)."""
    chain = chain_links(ledger.entries(), since)
    return {"chain": chain, "head": chain[-1][2], "key": ledger.public_key_hex}


def _check(last: Head | None, reply: dict, pinned: str | None = None) -> Head:
    return check_chain(last, reply["chain"], reply["head"], reply["key"], pinned)


def test_a_growing_ledger_is_accepted_and_its_head_advances(tmp_path):
    ledger = _ledger(tmp_path / "l.jsonl", 2)
    first = _check(None, _reply(ledger, None))  # trust on first use: the newest entry
    assert (first.seq, first.pinned) == (1, False)
    assert first.entry_hash == ledger.head_hash and first.key == public_key_hex(KEY)
    _ledger(tmp_path / "l.jsonl", 3, tag="b")  # 3 more entries, e.g. other runs' rounds
    reply = _reply(ledger, first.seq)
    assert [link[0] for link in reply["chain"]] == [2, 3, 4]
    last = _check(first, reply)
    assert last == Head(4, ledger.head_hash, first.key, pinned=False)
    # a kept reply re-sent to a coordinator resumed after a crash: the same head, accepted
    assert _check(last, _reply(ledger, last.seq)) == last


@pytest.mark.parametrize("kept", [0, 2, 3], ids=["emptied", "truncated", "rolled-back"])
def test_a_ledger_cut_back_to_or_below_the_head_is_refused(tmp_path, kept):
    path = tmp_path / "l.jsonl"
    ledger = _ledger(path, 5)
    last = _check(None, _reply(ledger, None))  # seq 4
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:kept]))  # truncated, or an earlier copy restored
    ledger.append({"type": "note", "n": "after"})  # the next round's spend: seq `kept`
    with pytest.raises(HeadError) as refused:
        _check(last, _reply(ledger, last.seq))
    assert str(refused.value) == (f"ledger seq {kept} does not extend the last head seq 4 "
                                  "(rolled back or truncated?)")


def test_a_rolled_back_and_regrown_ledger_is_refused_as_a_fork(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = _ledger(path, 3)
    last = _check(None, _reply(ledger, None))  # seq 2
    copy = tmp_path / "copy.jsonl"
    shutil.copy(path, copy)
    _ledger(path, 2, tag="spent")  # seq 3, 4: spends the rollback would erase
    shutil.copy(copy, path)  # back to seq 0-2 ...
    regrown = _ledger(path, 1, tag="x")  # ... then seq 3' from the restored copy
    accepted = _check(last, _reply(regrown, last.seq))
    assert accepted.seq == 3  # from the coordinator's view, a consistent extension
    shutil.copy(copy, path)
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:2]))
    forked = _ledger(path, 3, tag="fork")  # seq 2'', 3'', 4'': seq 2 rewritten
    with pytest.raises(HeadError, match=r"ledger seq 4 does not extend the last head seq 3 "
                       r"\(.{12}\): its prev_hash is .{12} \(the ledger was rolled back and "
                       r"rewritten, or forked\)"):
        _check(accepted, _reply(forked, accepted.seq))


def test_withheld_entries_and_bad_signatures_are_refused(tmp_path):
    ledger = _ledger(tmp_path / "l.jsonl", 2)
    last = _check(None, _reply(ledger, None))  # seq 1
    _ledger(tmp_path / "l.jsonl", 3, tag="b")  # seq 2-4
    with pytest.raises(HeadError, match="starts at seq 3, not right after the last head "
                                        r"seq 1 \(entries withheld\)"):
        _check(last, _reply(ledger, last.seq + 1))
    reply = _reply(ledger, last.seq)
    reply["chain"][1][3] = reply["chain"][0][3]  # seq 3 carries seq 2's signature
    with pytest.raises(HeadError, match="ledger seq 3: the signature does not verify"):
        _check(last, reply)
    reply = _reply(ledger, last.seq)
    del reply["chain"][1]  # a gap inside the chain
    with pytest.raises(HeadError, match="ledger seq 4 does not follow seq 2"):
        _check(last, reply)
    with pytest.raises(HeadError, match="not at the reply's head"):
        _check(last, {**_reply(ledger, last.seq), "head": "ab" * 32})
    with pytest.raises(HeadError, match="spent budget but carries no ledger chain"):
        _check(last, {"chain": [], "head": None, "key": None})


def test_a_ledger_re_signed_with_a_new_key_is_refused_pinned_or_not(tmp_path):
    honest = _ledger(tmp_path / "l.jsonl", 2)
    pinned = public_key_hex(KEY)
    tofu = _check(None, _reply(honest, None))
    enrolled = _check(None, _reply(honest, None), pinned)
    assert not tofu.pinned and enrolled.pinned
    forged = _ledger(tmp_path / "forged.jsonl", 4, key=OTHER)  # re-chained, re-signed
    with pytest.raises(HeadError, match=r"signed by a new key \w{16}, not the key \w{16} "
                                        r"first seen for it \(trust on first use"):
        _check(tofu, _reply(forged, tofu.seq))
    with pytest.raises(HeadError, match=r"signed by a new key \w{16}, not the key \w{16} "
                                        "pinned at enrolment"):
        _check(enrolled, _reply(forged, enrolled.seq), pinned)
    # a pinned key is enforced from the first contact; trust on first use cannot be
    with pytest.raises(HeadError, match="pinned at enrolment"):
        _check(None, _reply(forged, None), pinned)
    assert _check(None, _reply(forged, None)).key == public_key_hex(OTHER)


def test_heads_survive_the_checkpoint_and_merge_across_runs(tmp_path):
    ledger = _ledger(tmp_path / "l.jsonl", 3)
    head = _check(None, _reply(ledger, None))
    book = HeadBook({"a": head})
    assert HeadBook.from_json(json.loads(json.dumps(book.to_json()))) == book
    assert book.to_json()["a"]["key_id"] == head.key_id and book.since("b") is None

    cfg = RunConfig()
    ckpt = checkpoint.Checkpoint(
        round=1, federation_id="fed-x", config=cfg.to_json_dict(), arrays={}, scales={},
        fingerprints=[], adapter=None, rng_state=(3, tuple(range(625)), None), ranks={},
        metrics={"rounds": []}, heads=book.to_json())
    checkpoint.save(tmp_path / "ckpt", ckpt)
    resumed = checkpoint.load(tmp_path / "ckpt", cfg)
    assert resumed is not None and HeadBook.from_json(resumed.heads) == book

    # two runs of one coordinator share a book: each keeps the newer head per silo
    older = HeadBook({"a": dataclasses.replace(head, seq=1), "b": head})
    with shared_book(tmp_path / "heads.json") as shared:
        shared[0] = shared[0].merged(book)
    with shared_book(tmp_path / "heads.json") as shared:
        merged = older.merged(shared[0])
    assert merged.since("a") == 2 and merged.since("b") == 2


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_a_real_silos_replies_extend_its_head_until_its_ledger_is_rolled_back(
        tiny_model_dir, toy_dataset_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    source = _source(cfg, POLICY)
    silo = source(_context())
    app = build_client_app(source)
    heads: list[Head] = []
    copy = tmp_path / "ledger-after-round-1.jsonl"
    for round_ in (1, 2):
        since = heads[-1].seq if heads else None
        reply = app(_train_msg(cfg, round_, ledger_since=since), _context())
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        answer = TrainReply.from_message(reply)
        heads.append(check_chain(heads[-1] if heads else None, answer.ledger_chain or [],
                                 answer.ledger_head, answer.ledger_key, None))
        if round_ == 1:
            shutil.copy(silo.ledger_path, copy)
    assert [h.seq for h in heads] == [0, 1]
    assert heads[-1].entry_hash == silo.ledger().head_hash

    shutil.copy(copy, silo.ledger_path)  # someone restores the ledger of round 1
    msg = _train_msg(cfg, 3, ledger_since=heads[-1].seq)
    assert TrainInstruction.from_message(msg).ledger_since == 1  # on the wire
    answer = TrainReply.from_message(app(msg, _context()))
    with pytest.raises(HeadError, match=r"ledger seq 1 does not extend the last head seq 1 "
                                        r"\(rolled back or truncated\?\)"):
        check_chain(heads[-1], answer.ledger_chain or [], answer.ledger_head,
                    answer.ledger_key, None)


def test_the_key_the_agent_prints_is_the_one_the_coordinator_pins(tmp_path, capsys):
    state = tmp_path / "silo-state"
    assert main(["agent", "--show-ledger-key", "--state-dir", str(state)]) == 0
    printed = capsys.readouterr().out
    assert main(["agent", "--state-dir", str(state), "--show-ledger-key"]) == 0
    assert capsys.readouterr().out == printed  # created once, then the same key
    (tmp_path / "ledger.pub").write_text(printed)  # what the admin sends the operator
    pinned = ledger_key_hex(tmp_path / "ledger.pub")
    ledger = Ledger(state / "ledger.jsonl", load_or_create_signing_key(state / LEDGER_KEY_FILE))
    ledger.append({"type": "note"})
    assert _check(None, _reply(ledger, None), pinned).pinned
