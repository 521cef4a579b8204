"""A silo's durable copy of the global update history (the downlink sends new rounds only)."""

from __future__ import annotations

import numpy as np
import pytest

from silotune.client.history import MissingRoundsError, complete_history
from silotune.protocol.codec import round_digest


def _rounds(n: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """`n` global updates as the coordinator holds them (fp32), and their fingerprints."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    prints = []
    for t in range(1, n + 1):
        one = {f"round-{t}/m.lora_A": rng.standard_normal((2, 3)).astype(np.float16),
               f"round-{t}/m.lora_B": rng.standard_normal((4, 2)).astype(np.float16)}
        one = {k: v.astype(np.float32) for k, v in one.items()}  # fp16-exact, as on the wire
        arrays.update(one)
        prints.append(round_digest(one))
    return arrays, prints


def _as_sent(arrays: dict[str, np.ndarray], first: int) -> dict[str, np.ndarray]:
    """What a message carrying rounds >= `first` holds, in the fp16 wire dtype."""
    return {k: v.astype(np.float16) for k, v in arrays.items()
            if int(k.split("-")[1].split("/")[0]) >= first}


def test_later_messages_need_only_the_new_rounds(tmp_path):
    arrays, prints = _rounds(3)
    first = complete_history(tmp_path, _as_sent(arrays, 1), prints[:2], first_sent=1)
    assert sorted(first) == sorted(k for k in arrays if not k.startswith("round-3/"))
    full = complete_history(tmp_path, _as_sent(arrays, 3), prints, first_sent=3)
    assert full.keys() == arrays.keys()
    for k, v in arrays.items():
        np.testing.assert_array_equal(np.asarray(full[k], np.float32), v)
    assert complete_history(tmp_path, {}, [], first_sent=1) == {}  # before round 1


def test_a_lost_or_damaged_copy_is_named_and_a_full_resend_repairs_it(tmp_path):
    arrays, prints = _rounds(3)
    with pytest.raises(MissingRoundsError, match=r"rounds \[1, 2\]"):
        complete_history(tmp_path / "never-kept", _as_sent(arrays, 3), prints, first_sent=3)
    complete_history(tmp_path, _as_sent(arrays, 1), prints[:2], first_sent=1)
    (tmp_path / "round-2.npz").write_bytes(b"not an npz")
    with pytest.raises(MissingRoundsError, match=r"rounds \[2\]"):
        complete_history(tmp_path, _as_sent(arrays, 3), prints, first_sent=3)
    np.savez(tmp_path / "round-1.npz", **{"round-1/m.lora_A": np.zeros((2, 3), np.float32)})
    with pytest.raises(MissingRoundsError, match=r"rounds \[1, 2\]"):  # wrong content
        complete_history(tmp_path, _as_sent(arrays, 3), prints, first_sent=3)
    repaired = complete_history(tmp_path, _as_sent(arrays, 1), prints, first_sent=1)
    assert repaired.keys() == arrays.keys()
    assert complete_history(tmp_path, {}, prints, first_sent=4).keys() == arrays.keys()


def test_a_received_round_that_does_not_match_its_fingerprint_is_refused(tmp_path):
    arrays, prints = _rounds(2)
    sent = _as_sent(arrays, 1)
    sent["round-2/m.lora_B"] = sent["round-2/m.lora_B"] * 2
    with pytest.raises(ValueError, match="round 2 does not match its fingerprint"):
        complete_history(tmp_path, sent, prints, first_sent=1)
