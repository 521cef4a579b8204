"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Every state file silotune keeps (metrics, checkpoints, kept replies, global rounds, SLM
weights, converted models' markers) is written to a temporary file in the same folder,
flushed to disk, and renamed over the target in one step.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write name-keyed arrays as an uncompressed ``.npz`` (no pickles) atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write `obj` as strict JSON (no NaN or infinity) to `path` atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False)
    atomic_write_text(path, text + "\n" if indent is not None else text)
