"""The fingerprint of a silo's dataset that its ledger entries record.

The privacy budget belongs to the dataset (docs/privacy.md §6): every ``train`` and
``audit`` entry names the data it was spent on by this hash, so a changed dataset shows.
"""

from __future__ import annotations

import hashlib

import pandas as pd


def dataset_fingerprint(frame: pd.DataFrame) -> str:
    """sha256 over the silo's (text, label) rows in order: detects a changed dataset."""
    h = hashlib.sha256()
    for text, label in zip(frame["text"], frame["label"], strict=True):
        h.update(f"{len(text)}:{text}|{label}\n".encode())
    return h.hexdigest()
