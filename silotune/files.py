"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Every state file silotune keeps (metrics, checkpoints, kept replies, global rounds, SLM
weights, converted models' markers) is written to a temporary file in the same folder,
flushed to disk, and renamed over the target in one step. The temporary file is created
with mode 0600, so the renamed file is readable by its owner only.

State directories (a coordinator's database, a silo's ledger and keys) are private to
the service's user: `private_dir` makes them 0700, and the deployment commands run under
`PRIVATE_UMASK`, as do the Flower processes they start, so what they create is 0600 /
0700 (deploy/README.md, "Hardening").
"""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

PRIVATE_UMASK = 0o077  # new files 0600, directories 0700


def private_dir(path: Path) -> Path:
    """Create `path` (and missing parents) and make it 0700, also when it already
    existed with a looser mode; returns `path`.

    Raises `PermissionError`, naming the fix, for a folder that is not the caller's to
    make private: a shared one (sticky bit, like ``/tmp``) or another user's (such as the
    root of a Kubernetes volume); give the service a folder of its own inside it.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = path.stat().st_mode
    if stat.S_IMODE(mode) == 0o700:
        return path
    fix = f"use a folder of its own inside it, e.g. {path / 'state'}"
    if mode & stat.S_ISVTX:
        raise PermissionError(f"{path} is a shared folder (sticky bit, like /tmp) and "
                              f"cannot hold private state; {fix}")
    try:
        os.chmod(path, 0o700)
    except PermissionError as err:
        raise PermissionError(f"{path} belongs to another user, so silotune cannot make "
                              f"it private (mode 0700); {fix}") from err
    return path


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
