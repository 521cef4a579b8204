"""The coordinator's checkpoint: round trip, configuration guard, damage detection, and
a crash at every step of a save leaving the previous round or the new one, complete."""

from __future__ import annotations

import itertools
import json
import os
import random
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from silotune.adapters.codec import update_to_arrays
from silotune.adapters.types import LoraFactors, LowRankUpdate
from silotune.config import ConfigError, RunConfig
from silotune.protocol.codec import round_digest
from silotune.server import checkpoint


def _checkpoint(cfg: RunConfig, round_: int = 2) -> checkpoint.Checkpoint:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for t in range(1, round_ + 1):
        arrays[f"round-{t}/m.lora_A"] = rng.standard_normal((2, 3)).astype(np.float32)
        arrays[f"round-{t}/m.lora_B"] = rng.standard_normal((4, 2)).astype(np.float32)
    fingerprints = [round_digest({k: v for k, v in arrays.items()
                                  if k.startswith(f"round-{t}/")})
                    for t in range(1, round_ + 1)]
    adapter = LowRankUpdate({"m": LoraFactors(A=np.ones((1, 3), np.float32),
                                              B=np.full((4, 1), round_, np.float32))}, 0.5)
    sampler = random.Random(7)
    for _ in range(round_):
        sampler.random()
    return checkpoint.Checkpoint(
        round=round_, federation_id="fed-x", config=cfg.to_json_dict(), arrays=arrays,
        scales={str(t): 1.0 for t in range(1, round_ + 1)}, fingerprints=fingerprints,
        adapter=adapter, rng_state=sampler.getstate(), ranks={"a": 4},
        metrics={"rounds": [{"round": t} for t in range(1, round_ + 1)]})


def _same(got: checkpoint.Checkpoint | None, want: checkpoint.Checkpoint) -> bool:
    """`got` is `want`, complete: every field, every array bit."""
    if got is None:
        return False
    fields = ("round", "federation_id", "config", "scales", "fingerprints", "ranks",
              "metrics")
    if any(getattr(got, f) != getattr(want, f) for f in fields):
        return False
    if tuple(got.rng_state) != tuple(want.rng_state):
        return False
    if sorted(got.arrays) != sorted(want.arrays) or not all(
            np.array_equal(got.arrays[k], v) for k, v in want.arrays.items()):
        return False
    if (got.adapter is None) != (want.adapter is None):
        return False
    if got.adapter is None or want.adapter is None:
        return True
    mine, theirs = update_to_arrays(got.adapter, ""), update_to_arrays(want.adapter, "")
    return (got.adapter.scale == want.adapter.scale and sorted(mine) == sorted(theirs)
            and all(np.array_equal(mine[k], v) for k, v in theirs.items()))


def test_checkpoint_round_trip_and_config_guard(tmp_path):
    cfg = RunConfig(out_dir=str(tmp_path))
    saved = _checkpoint(cfg)
    checkpoint.save(tmp_path / "ck", saved)
    resumed = RunConfig(out_dir="elsewhere", resume=True)  # free keys may differ
    loaded = checkpoint.load(tmp_path / "ck", resumed)
    assert _same(loaded, saved)
    assert loaded is not None and loaded.adapter is not None and loaded.adapter.scale == 0.5
    a, b = random.Random(), random.Random()
    a.setstate(loaded.rng_state)
    b.setstate(saved.rng_state)
    assert a.random() == b.random()
    assert checkpoint.load(tmp_path / "none", cfg) is None
    with pytest.raises(ConfigError, match="rounds: 4 -> 5"):
        checkpoint.load(tmp_path / "ck", RunConfig(rounds=5))


def test_only_the_committed_adapter_is_kept(tmp_path):
    cfg = RunConfig()
    for round_ in (1, 2, 3):
        checkpoint.save(tmp_path, _checkpoint(cfg, round_))
    state = json.loads((tmp_path / checkpoint.STATE).read_text())
    kept = sorted(p.name for p in tmp_path.glob(f"{checkpoint.ADAPTER_PREFIX}*"))
    assert kept == [state["adapter_file"]]
    plain = _checkpoint(cfg, 4)
    plain.adapter = None  # a rule without a global adapter (FLoRA)
    checkpoint.save(tmp_path, plain)
    assert not list(tmp_path.glob(f"{checkpoint.ADAPTER_PREFIX}*"))
    assert _same(checkpoint.load(tmp_path, cfg), plain)


def test_checkpoint_detects_damage_and_refuses_an_old_format(tmp_path):
    cfg = RunConfig()
    ck = _checkpoint(cfg, round_=3)
    checkpoint.save(tmp_path, ck)
    state = json.loads((tmp_path / checkpoint.STATE).read_text())
    adapter = tmp_path / state["adapter_file"]
    adapter.write_bytes(adapter.read_bytes()[:-8])
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(state["adapter_file"])):
        checkpoint.load(tmp_path, cfg)
    ck.arrays["round-1/m.lora_A"] = ck.arrays["round-1/m.lora_A"] + 1
    checkpoint.save(tmp_path, ck)
    with pytest.raises(checkpoint.CheckpointError, match="round 1's update"):
        checkpoint.load(tmp_path, cfg)
    state = json.loads((tmp_path / checkpoint.STATE).read_text())
    (tmp_path / checkpoint.STATE).write_text(json.dumps({**state, "version": 1}))
    with pytest.raises(checkpoint.CheckpointError, match=r"version 1.*another out-dir"):
        checkpoint.load(tmp_path, cfg)


class Crash(BaseException):
    """The coordinator process dies (BaseException: nothing in silotune catches it)."""


class Crasher:
    """Kill the writer right after its `at`-th file operation (a rename, an fsync or an
    unlink); afterwards every file operation does nothing, as in a dead process that
    cleans nothing up (its temporary files stay behind)."""

    OPERATIONS = ("replace", "rename", "fsync", "unlink")

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int) -> None:
        self.at, self.done, self.dead = at, 0, False
        for name in self.OPERATIONS:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def operation(*args: Any, **kwargs: Any) -> Any:
            if self.dead:
                return None
            result = real(*args, **kwargs)
            self.done += 1
            if self.done == self.at:
                self.dead = True
                raise Crash(f"killed after file operation {self.at}")
            return result
        return operation


def test_a_crash_at_any_step_of_a_save_leaves_one_complete_round(tmp_path, monkeypatch):
    cfg = RunConfig()
    before, after = _checkpoint(cfg, round_=2), _checkpoint(cfg, round_=3)
    found = []
    for at in itertools.count(1):
        folder = tmp_path / f"crash-after-{at}"
        checkpoint.save(folder, before)
        with monkeypatch.context() as patched:
            crasher = Crasher(patched, at)
            try:
                checkpoint.save(folder, after)
            except Crash:
                pass
        loaded = checkpoint.load(folder, cfg)
        assert _same(loaded, before) or _same(loaded, after), f"torn after step {at}"
        assert loaded is not None
        found.append(loaded.round)
        if not crasher.dead:  # the save ended before its `at`-th operation
            break
        checkpoint.save(folder, after)  # the restarted coordinator redoes the round
        assert _same(checkpoint.load(folder, cfg), after)
    assert found[0] == 2 and found[-1] == 3 and found == sorted(found)
    assert len(found) >= 8  # renames and fsyncs of three files and the folder
