"""The coordinator's checkpoint after every round, and resuming from it.

Flower's `Strategy.start` cannot resume (docs/flower.md §2, §7.6), so the round loop
writes, after each completed round, everything needed to continue as if never stopped:

- ``updates.npz``: the merged global updates ``round-<t>/<module>.lora_{A,B}`` (append
  only: the global base is the original base plus these, in order);
- ``adapter-<sha256>.npz``: the global adapter that FedIT-family rules carry on top of
  the base, named by its content, so a new round's adapter never overwrites the one the
  committed ``state.json`` names;
- ``state.json``: the round, the federation id the silos record in their ledgers, the
  update scales and fingerprints, the adapter's file and digest, the sampling RNG state,
  each silo's current rank, the run config, the metrics so far and the last ledger
  head accepted from each silo (silotune/server/heads.py).

Commit: the data files are written first (each atomically: temporary file, fsync,
rename; silotune/files.py), the folder is fsynced, and then the one rename of
``state.json`` commits the round; adapters no ``state.json`` names are deleted after.
A crash at any point leaves the previous round or the new one, complete: ``updates.npz``
only grows and the loader ignores rounds after the committed one, and the committed
adapter file is never touched before the commit.

A restarted coordinator given ``resume = true`` (``silotune run --resume``) loads this,
rebuilds the global base and continues at the next round with the same federation id,
so no silo trains a completed round again and a non-private run ends with the same
global state as an uninterrupted one (the RNG state covers silo sampling; a non-private
run's training is seeded by the public run seed; DP noise never is, docs/architecture.md
convention 11).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from silotune.adapters.codec import update_from_arrays, update_to_arrays
from silotune.adapters.types import LowRankUpdate
from silotune.config import ConfigError, RunConfig
from silotune.files import atomic_write_json, atomic_write_npz
from silotune.protocol.codec import round_digest

STATE = "state.json"
UPDATES = "updates.npz"
ADAPTER_PREFIX = "adapter-"  # + the adapter's sha256 (first 16 hex digits) + ".npz"
VERSION = 2  # 1: a single adapter.npz, replaced before state.json (not crash-safe)
# Keys that may differ between the interrupted run and its resumption.
_FREE_KEYS = frozenset({"out_dir", "resume"})


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable, torn, or belongs to another run."""


@dataclass
class Checkpoint:
    """The global state after round `round` (see the module docstring)."""

    round: int
    federation_id: str
    config: dict[str, Any]
    arrays: dict[str, np.ndarray]  # the update history, "round-<t>/<module>.lora_{A,B}"
    scales: dict[str, float]  # "<t>" -> scale of round t's update
    fingerprints: list[str]  # sha256 of each merged round, in order
    adapter: LowRankUpdate | None
    rng_state: Any  # random.Random.getstate() of the silo sampler
    ranks: dict[str, int]
    metrics: dict[str, Any]  # metrics.json as of this round
    heads: dict[str, Any] = field(default_factory=dict)  # silo -> ledger head (heads.py)


def new_federation_id() -> str:
    """A fresh id for one federation, kept across coordinator restarts."""
    return f"fed-{secrets.token_hex(8)}"


def save(folder: Path, ckpt: Checkpoint) -> None:
    """Write `ckpt` under `folder`; the rename of ``state.json`` commits it (see the
    module docstring), so a crash at any point leaves the previous round or this one."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_npz(folder / UPDATES, ckpt.arrays)
    adapter_file: str | None = None
    adapter_digest: str | None = None
    if ckpt.adapter is not None:
        adapter_arrays = update_to_arrays(ckpt.adapter, "")
        adapter_digest = _digest(adapter_arrays)
        adapter_file = f"{ADAPTER_PREFIX}{adapter_digest[:16]}.npz"
        atomic_write_npz(folder / adapter_file, adapter_arrays)
    _sync_folder(folder)  # the data files' renames are durable before the commit
    state = {
        "version": VERSION, "round": ckpt.round, "federation_id": ckpt.federation_id,
        "scales": ckpt.scales, "fingerprints": ckpt.fingerprints,
        "adapter_scale": ckpt.adapter.scale if ckpt.adapter is not None else None,
        "adapter_file": adapter_file, "adapter_sha256": adapter_digest,
        "rng_state": [ckpt.rng_state[0], list(ckpt.rng_state[1]), ckpt.rng_state[2]],
        "ranks": ckpt.ranks, "config": ckpt.config, "metrics": ckpt.metrics,
        "ledger_heads": ckpt.heads}
    atomic_write_json(folder / STATE, state, indent=1)  # the commit
    _sync_folder(folder)
    for stale in folder.glob(f"{ADAPTER_PREFIX}*.npz"):
        if stale.name != adapter_file:
            stale.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """fsync `folder` itself, so that the renames inside it survive a power loss."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(folder: Path, cfg: RunConfig) -> Checkpoint | None:
    """The checkpoint in `folder` for run `cfg`, or None when there is none yet.

    Raises
    ------
    CheckpointError
        The files are unreadable or inconsistent.
    ConfigError
        The checkpoint was written by a run with a different configuration.
    """
    path = folder / STATE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
        with np.load(folder / UPDATES, allow_pickle=False) as data:
            stored = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"cannot read the checkpoint in {folder}: {err}") from err
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, this "
                              f"silotune reads version {VERSION}; resume it with the "
                              "silotune that wrote it, or start a new run with another "
                              "out-dir")
    _check_config(state["config"], cfg, folder)
    round_ = int(state["round"])
    # Updates of a round after `round_` may exist if the coordinator died while saving.
    arrays = {k: v for k, v in stored.items()
              if int(k[len("round-"):].partition("/")[0]) <= round_}
    fingerprints = [str(f) for f in state["fingerprints"]]
    for t, expected in enumerate(fingerprints, start=1):
        found = round_digest({k: v for k, v in arrays.items() if k.startswith(f"round-{t}/")})
        if found != expected:
            raise CheckpointError(f"{folder / UPDATES}: round {t}'s update does not match "
                                  "its fingerprint in state.json; the checkpoint is damaged")
    adapter = None
    if state["adapter_file"] is not None:
        adapter_path = folder / str(state["adapter_file"])
        try:
            with np.load(adapter_path, allow_pickle=False) as data:
                adapter_arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"cannot read {adapter_path}, named by {path}: {err}; "
                                  "the checkpoint is damaged") from err
        if _digest(adapter_arrays) != state["adapter_sha256"]:
            raise CheckpointError(f"{adapter_path} does not match its digest in {path}; "
                                  "the checkpoint is damaged")
        adapter = update_from_arrays(adapter_arrays, "", float(state["adapter_scale"]))
    version, internal, gauss = state["rng_state"]
    return Checkpoint(
        round=round_, federation_id=str(state["federation_id"]), config=state["config"],
        arrays=arrays, scales={str(k): float(v) for k, v in state["scales"].items()},
        fingerprints=fingerprints, adapter=adapter,
        rng_state=(version, tuple(internal), gauss),
        ranks={str(k): int(v) for k, v in state["ranks"].items()}, metrics=state["metrics"],
        heads=dict(state.get("ledger_heads") or {}))


def _digest(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(arrays[key]).tobytes())
    return digest.hexdigest()


def _check_config(saved: dict[str, Any], cfg: RunConfig, folder: Path) -> None:
    now = cfg.to_json_dict()
    differ = sorted(k for k in set(saved) | set(now)
                    if k not in _FREE_KEYS and saved.get(k) != now.get(k))
    if differ:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
        raise ConfigError(f"the checkpoint in {folder} belongs to a run with another "
                          f"configuration ({detail}); resume with the same settings, or "
                          "start a new run with another out-dir")
