"""A silo's copy of the global base model, kept at the coordinator's current version.

FLoRA carries nothing low-rank across rounds: the global state is the base merged with
every round's stacked update, in order (docs/algorithms.md §2.2). A silo holds every
round's update on disk (client/history.py; a train message carries only the rounds it
lacks), so a silo that missed rounds (or a fresh worker) replays the ones the cached base
lacks and lands on the exact global base. The store is per process: simulated silos on
one worker share one base instead of one copy per silo.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from silotune.adapters.types import LowRankUpdate
from silotune.ml.lm import load_model
from silotune.ml.merge import apply_update


@dataclass
class _Entry:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    version: int = 0  # rounds merged so far
    fingerprints: list[str] = field(default_factory=list)  # of each merged round


class BaseStore:
    """Process-wide cache: model path -> base at some version."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()

    def get(self, model_path: str, run: str, updates: Sequence[LowRankUpdate],
            fingerprints: Sequence[str]) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
        """The base of run `run` after merging `updates` (all rounds, in order).

        A cached copy is advanced by the rounds it lacks; a cached copy whose history
        differs from `fingerprints` (e.g. another run) is reloaded from disk first.
        """
        with self._lock:
            key = (model_path, run)
            entry = self._entries.get(key)
            known = list(fingerprints[: entry.version]) if entry else []
            if entry is None or entry.fingerprints != known:
                for other in [k for k in self._entries if k[0] == model_path]:
                    del self._entries[other]  # one base per model path per process
                model, tok = load_model(model_path)
                entry = self._entries[key] = _Entry(model, tok)
            for t in range(entry.version, len(updates)):
                apply_update(entry.model, updates[t])
                entry.fingerprints.append(fingerprints[t])
                entry.version += 1
            return entry.model, entry.tokenizer


STORE = BaseStore()
