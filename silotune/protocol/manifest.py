"""The release manifest: every field any silo reply can carry, and why it may leave.

Each field of each reply type (`silotune.protocol.messages`) is listed once here with the
reason it is safe to release (docs/privacy.md §7):

- ``dp``: the output of a DP mechanism the silo ran and charged to its ledger;
- ``post``: post-processing of DP outputs and of public inputs (no extra epsilon);
- ``declared``: public by the silo operator's declaration (its name, a public dataset
  size, its resource profile) or by the run's public configuration;
- ``accounting``: the privacy accounting itself (epsilon, delta, limit, sigma, ledger
  head), computed from the silo's public parameters;
- ``simulation``: measurements that only a simulated silo sends (one operator holds every
  simulated silo's data); a deployed silo never sets them.

`check_reply` refuses to send a reply with a field not listed, so a field added to a
message without a decision here cannot leave a silo; the test suite drives every reply
kind and compares the records on the wire with this list.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from silotune.protocol.messages import (
    HelloReply,
    ImportanceReply,
    Payload,
    ScoreReply,
    SlmTrainReply,
    TrainReply,
)

KINDS: Final = ("dp", "post", "declared", "accounting", "simulation")

_SIZE = ("declared", "the dataset size the silo's operator declares public (the "
         "aggregation weight); absent when none is declared")
_ID = ("declared", "the silo's name, chosen by its operator")
_EPS = ("accounting", "cumulative epsilon of the silo's data, from its ledger")
_DELTA = ("accounting", "the silo's delta")
_LIMIT = ("accounting", "the silo's lifetime epsilon limit (its policy)")
_SIGMA = ("accounting", "the noise multiplier the silo calibrated for the run")
_HEAD = ("accounting", "hash of the silo's newest ledger entry")
_CHAIN = ("accounting", "seq, prev_hash, entry_hash and signature of each ledger entry "
          "since the head the coordinator acknowledged: counts, hashes and signatures only "
          "(an entry hash is a SHA-256 over the entry, not invertible); the entries stay home")
_KEY = ("accounting", "the silo's ledger public key (Ed25519): public by construction, "
        "the key its operator registers at enrolment")

MANIFEST: Final[dict[type[Payload], dict[str, tuple[str, str]]]] = {
    HelloReply: {
        "silo_id": _ID, "num_examples": _SIZE,
        "profile": ("declared", "the resource profile the silo's operator declares"),
    },
    TrainReply: {
        "silo_id": _ID, "num_examples": _SIZE,
        "base_version": ("post", "global rounds the silo holds: a function of the "
                                 "coordinator's own messages"),
        "steps": ("declared", "DP-SGD steps taken: the instruction's local steps"),
        "epsilon": _EPS, "delta": _DELTA, "epsilon_limit": _LIMIT,
        "noise_multiplier": _SIGMA, "ledger_head": _HEAD,
        "ledger_chain": _CHAIN, "ledger_key": _KEY,
        "worker": ("simulation", "the Ray node that ran the simulated silo"),
        "peak_memory": ("simulation", "peak memory of the simulated silo's training"),
        "arrays": ("dp", "the LoRA factors after DP-SGD (clipped, noised, secret "
                         "Poisson batches), compressed on request (post-processing)"),
    },
    ImportanceReply: {
        "num_examples": _SIZE,
        "max_tokens": ("declared", "the run's public truncation length (a simulated "
                                   "silo: its own longest example)"),
        "scores": ("dp", "per-matrix sensitivities: per-example clipped, Gaussian noise, "
                         "charged to the ledger as an importance entry"),
    },
    SlmTrainReply: {
        "silo_id": _ID, "num_examples": _SIZE,
        "steps": ("declared", "DP-SGD steps taken: the request's SLM steps"),
        "slm_accuracy": ("simulation", "the SLM's accuracy on the simulation's held-out "
                                       "split (CrossLM runs in simulation only)"),
        "epsilon": _EPS, "delta": _DELTA, "epsilon_limit": _LIMIT,
        "noise_multiplier": _SIGMA, "ledger_head": _HEAD,
        "ledger_chain": _CHAIN, "ledger_key": _KEY,
    },
    ScoreReply: {
        "silo_id": _ID, "num_examples": _SIZE,
        "scores": ("post", "the DP-trained SLM's probabilities on the coordinator's public "
                           "synthetic texts (ledgered as a feedback entry)"),
        "slm_dp": ("declared", "whether the scoring SLM was trained with DP-SGD"),
        "ledger_head": _HEAD,
    },
}


class UnlistedFieldError(RuntimeError):
    """A reply field that the release manifest does not list."""


def wire_keys(reply_type: type[Payload]) -> dict[str, str]:
    """Record key on the wire -> field name, for every field of `reply_type`."""
    return {f.metadata["key"]: f.name for f in dataclasses.fields(reply_type)}


def check_reply(reply: Payload, *, simulated: bool) -> None:
    """Raise `UnlistedFieldError` for a field of `reply` that is set but not listed, or a
    simulation-only field set by a deployed silo."""
    listed = MANIFEST.get(type(reply), {})
    for f in dataclasses.fields(reply):
        value = getattr(reply, f.name)
        if value is None or (f.name == "arrays" and not value and f.name in listed):
            continue
        if f.name not in listed:
            raise UnlistedFieldError(f"{type(reply).__name__}.{f.name} is not in the release "
                                     "manifest (silotune/protocol/manifest.py)")
        if listed[f.name][0] == "simulation" and not simulated:
            raise UnlistedFieldError(f"{type(reply).__name__}.{f.name} is sent by simulated "
                                     "silos only")
