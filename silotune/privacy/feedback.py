"""Ledger entries for CrossLM feedback releases, and their audit check.

A silo that returns scores of its SLM on the coordinator's synthetic texts releases a
function of a DP-SGD-trained model evaluated on public inputs, never on its records:
post-processing, which costs no extra epsilon (Dwork & Roth 2014, Prop. 2.1). The ledger
still records every release, so that an auditor can see *that* it happened, *which*
DP-trained model produced it (the train entry's hash) and that no budget was charged for
it. `check_feedback_entry` is what ``silotune audit`` (via ``verify_ledger``) checks.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from silotune.privacy.ledger import Ledger

BASIS = ("post-processing: scores of a DP-SGD-trained model on public synthetic inputs; "
         "no private record is read")


def digest(obj: Any) -> str:
    """sha256 of canonical JSON (the request and the scores are recorded by digest only)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                     allow_nan=False).encode()).hexdigest()


def last_train_entry(entries: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The most recent ``type == "train"`` entry, or None."""
    return next((e for e in reversed(entries) if e.get("type") == "train"), None)


def record_feedback(ledger: Ledger, *, silo_id: str, run_id: str, round_: int,
                    request: Any, scores: Sequence[float]) -> dict[str, Any]:
    """Append a signed ``feedback`` entry for releasing `scores` (answering `request`).

    The entry names the train entry of the SLM that produced the scores and repeats its
    cumulative epsilon: the release adds ``epsilon_cost = 0``. Raises ValueError when the
    ledger holds no DP training (then the scores would not be post-processing of DP).
    """
    train = last_train_entry(ledger.entries())
    if train is None:
        raise ValueError(f"{silo_id}: the ledger records no DP-SGD training of this SLM, so "
                         "its feedback would not be post-processing of a DP model; train it "
                         "with DP first")
    return ledger.append({
        "type": "feedback",
        "silo_id": silo_id,
        "run_id": run_id,
        "round": round_,
        "released": "scores",
        "count": len(scores),
        "request_sha256": digest(request),
        "scores_sha256": digest([float(s) for s in scores]),
        "model_entry_hash": train["entry_hash"],
        "dp_trained": True,
        "epsilon_cost": 0.0,
        "basis": BASIS,
        "epsilon": train["epsilon"],
        "delta": train["delta"],
    })


def check_feedback_entry(entry: Mapping[str, Any], label: str,
                         last_train: Mapping[str, Any] | None, problems: list[str]) -> None:
    """Audit one feedback entry against the latest train entry before it.

    Checks: only scores were released; the release charged exactly 0 epsilon and left the
    accounting history alone; the scoring model was DP-trained and is the latest train
    entry; the stated cumulative epsilon and delta are that entry's.
    """
    if entry.get("released") != "scores":
        problems.append(f"{label}: released: {entry.get('released')!r}, but feedback may "
                        "release scores only")
    if entry.get("epsilon_cost") != 0.0:
        problems.append(f"{label}: epsilon_cost: {entry.get('epsilon_cost')!r}; a feedback "
                        "release is post-processing and must cost exactly 0")
    if "accounting_history" in entry:
        problems.append(f"{label}: accounting_history: a feedback entry must not change the "
                        "accounting history")
    if entry.get("dp_trained") is not True:
        problems.append(f"{label}: dp_trained: feedback from an SLM not trained with DP is "
                        "not post-processing")
    if last_train is None:
        problems.append(f"{label}: model_entry_hash: no train entry precedes this feedback")
        return
    if entry.get("model_entry_hash") != last_train.get("entry_hash"):
        problems.append(f"{label}: model_entry_hash: does not name the latest train entry "
                        f"(seq {last_train.get('seq')})")
    for field in ("epsilon", "delta"):
        stated, trained = entry.get(field), last_train.get(field)
        if not (isinstance(stated, int | float) and isinstance(trained, int | float)
                and math.isclose(float(stated), float(trained), rel_tol=1e-9, abs_tol=1e-12)):
            problems.append(f"{label}: {field}: {stated!r} differs from the model's train "
                            f"entry ({trained!r}); feedback must not change the budget")
