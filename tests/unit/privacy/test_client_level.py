"""Client-level DP (DP-FedAvg around FLoRA): update norms from factors, clipping, the
sensitivity bound of the released update, noise scale, accountant, ledger checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from silotune import strategies
from silotune.adapters.types import AdapterError, LoraFactors, SiloAdapter
from silotune.config import ConfigError, RunConfig
from silotune.privacy.client_level import (
    ClientLevelConfig,
    ClientLevelDP,
    check_client_level_entry,
    client_level_epsilon,
    clip_adapter,
    dense_factors,
    update_norm,
)
from silotune.privacy.ledger import Ledger, load_or_create_signing_key, verify_ledger
from silotune.server.client_dp import ClientLevelRun

SHAPES = {"l0.q": (6, 5), "l0.v": (4, 5)}


def _adapter(silo: str, rank: int, seed: int, size: float = 1.0, w: bool = False) -> SiloAdapter:
    rng = np.random.default_rng(seed)
    modules = {m: LoraFactors(A=rng.normal(size=(rank, d_in)),
                              B=size * rng.normal(size=(d_out, rank)),
                              w=rng.uniform(0.5, 2, rank) if w else None)
               for m, (d_out, d_in) in SHAPES.items()}
    return SiloAdapter(silo=silo, num_examples=10 * (seed + 1), scale=2.0, modules=modules)


def _dense(adapter: SiloAdapter) -> dict[str, np.ndarray]:
    return {m: adapter.scale * f.weighted_b() @ f.A for m, f in adapter.modules.items()}


def _wrapped(cfg: ClientLevelConfig, seed: int = 0) -> ClientLevelDP:
    rule = ClientLevelDP(strategies.create("flora"), cfg, rng=np.random.default_rng(seed))
    rule.setup({"a": 2, "b": 3, "c": 2}, SHAPES, seed=0)
    return rule


def _released(rule: ClientLevelDP, adapters: list[SiloAdapter]) -> dict[str, np.ndarray]:
    merge = rule.aggregate(adapters, None).merge
    assert merge is not None
    return {m: merge.dense(m) for m in SHAPES}


def test_update_norm_from_factors_equals_the_dense_norm():
    a = _adapter("a", 3, 1, w=True)
    dense = math.sqrt(sum(float(np.sum(d ** 2)) for d in _dense(a).values()))
    assert update_norm(a) == pytest.approx(dense, rel=1e-12)


def test_clipping_scales_the_product_to_the_clip_norm():
    big, small = _adapter("a", 3, 1, size=100.0), _adapter("b", 2, 2, size=1e-3)
    clipped, norm = clip_adapter(big, 1.5)
    assert norm > 1.5 and update_norm(clipped) == pytest.approx(1.5, rel=1e-9)
    assert clipped.num_examples == 1  # equal weights: DP-FedAvg's fixed-denominator mean
    same, _ = clip_adapter(small, 1.5)
    for m in SHAPES:
        np.testing.assert_allclose(_dense(same)[m], _dense(small)[m])


def test_dense_factors_are_exact():
    for shape in ((6, 5), (4, 5)):
        d = np.random.default_rng(0).normal(size=shape)
        f = dense_factors(d)
        assert f.rank == min(shape)
        np.testing.assert_allclose(f.B @ f.A, d)


def test_sensitivity_of_the_released_update_is_clip_over_k():
    """Adding or removing one silo (however large its update) moves the released update by
    at most C / k in Frobenius norm (same noise draw on both sides)."""
    cfg = ClientLevelConfig(noise_multiplier=1.0, clip_norm=0.7, population=3, per_round=3,
                            delta=1e-5)
    others = [_adapter("a", 2, 1), _adapter("b", 3, 2, w=True)]
    outlier = _adapter("c", 2, 3, size=1e3)
    with_c = _released(_wrapped(cfg, seed=5), [*others, outlier])
    without_c = _released(_wrapped(cfg, seed=5), others)
    diff = math.sqrt(sum(float(np.sum((with_c[m] - without_c[m]) ** 2)) for m in SHAPES))
    assert diff == pytest.approx(cfg.clip_norm / cfg.per_round, rel=1e-6)  # C/k exactly:
    # the outlier is clipped to norm C, then divided by the fixed k


def test_noise_std_is_z_clip_over_k_and_mean_is_the_clipped_average():
    cfg = ClientLevelConfig(noise_multiplier=2.0, clip_norm=0.5, population=4, per_round=4,
                            delta=1e-5)
    adapters = [_adapter(s, 2, i, size=1e-2) for i, s in enumerate("abc")]
    expected = {m: sum(_dense(a)[m] for a in adapters) / 4 for m in SHAPES}  # all < C
    draws = np.stack([np.concatenate([(_released(_wrapped(cfg, seed=s), adapters)[m]
                                       - expected[m]).ravel() for m in SHAPES])
                      for s in range(200)])  # (200, 50) noise samples
    assert draws.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.05)
    assert abs(draws.mean()) < 0.01


def test_client_level_epsilon_matches_reference_values():
    cfg = ClientLevelConfig(1.0, 1.0, population=10, per_round=10, delta=1e-5)
    eps = client_level_epsilon(cfg, 5)
    assert eps["rdp"] == pytest.approx(12.30, abs=0.01)  # docs/privacy.md §4: 5 releases, z=1
    assert eps["pld"] <= eps["rdp"]
    # the sampled silos are public (seeded, listed in metrics.json): no amplification
    assert client_level_epsilon(ClientLevelConfig(1.0, 1.0, 1000, 10, 1e-5), 5) == eps
    assert client_level_epsilon(cfg, 0) == {"rdp": 0.0, "pld": 0.0}
    more = client_level_epsilon(cfg, 6)["rdp"]
    assert more > eps["rdp"]


def test_only_linear_merge_rules_and_bad_settings_are_refused():
    cfg = ClientLevelConfig(1.0, 1.0, 2, 2, 1e-5)
    with pytest.raises(AdapterError, match="--strategy flora"):
        ClientLevelDP(strategies.create("fedit"), cfg)
    with pytest.raises(ValueError, match="silos per round"):
        ClientLevelConfig(1.0, 1.0, population=2, per_round=3, delta=1e-5)
    with pytest.raises(ValueError, match="noise multiplier"):
        ClientLevelConfig(0.0, 1.0, 2, 2, 1e-5)
    with pytest.raises(ConfigError, match="strategy"):
        RunConfig(strategy="fedit", client_dp_noise=1.0)
    with pytest.raises(ConfigError, match="profiles"):  # FedPipe: per-silo modules
        RunConfig(client_dp_noise=1.0, profiles="node")
    with pytest.raises(ConfigError, match="client_dp_clip"):
        RunConfig(client_dp_clip=0.0)
    assert RunConfig(client_dp_noise=1.0).to_flower()["client-dp-noise"] == 1.0


def test_coordinator_ledger_entries_verify_and_tampering_is_named(tmp_path):
    cfg = ClientLevelConfig(1.0, 1.0, population=3, per_round=3, delta=1e-5)
    rule = _wrapped(cfg)
    ledger = Ledger(tmp_path / "_client_level.jsonl",
                    load_or_create_signing_key(tmp_path / "key.pem"))
    entries = []
    for round_ in (1, 2, 3):
        rule.aggregate([_adapter("a", 2, round_, size=1e-3), _adapter("b", 3, round_ + 9, size=50)],
                       None)
        entries.append(ledger.append(rule.ledger_body(round_, "run-1")))
    assert verify_ledger(ledger.path) == []
    assert [e["releases"] for e in entries] == [1, 2, 3]
    assert entries[-1]["privacy_unit"] == "silo" and "clipped" not in entries[-1]
    assert entries[-1]["sampling"].startswith("public")
    assert entries[-1]["epsilon"] == pytest.approx(client_level_epsilon(cfg, 3)["rdp"])
    lowered = {**entries[2], "epsilon": entries[1]["epsilon"] * 0.5}
    problems = check_client_level_entry(lowered, entries[1])
    assert any(p.startswith("epsilon: stored") for p in problems)
    assert any("eps decreased" in p for p in problems)
    skipped = check_client_level_entry(entries[2], entries[0])
    assert skipped and skipped[0].startswith("releases: 3 does not follow 1")
    restarted = {**entries[2], "run_id": "run-2", "releases": 1}  # a resume that reset
    assert any(p.startswith("releases: 1 does not follow 2")
               for p in check_client_level_entry(restarted, entries[1]))


def test_a_resumed_run_continues_the_release_count_of_its_ledger(tmp_path):
    cfg = RunConfig(client_dp_noise=1.0, client_dp_clip=1.0)

    def run(rounds: range) -> ClientLevelRun:
        coordinator = ClientLevelRun(strategies.create("flora"), cfg, 3, 3, tmp_path,
                                     run_id=f"flower-{rounds.start}")
        coordinator.rule.setup({"a": 2, "b": 3}, SHAPES, seed=0)
        for round_ in rounds:
            coordinator.rule.aggregate([_adapter("a", 2, round_), _adapter("b", 3, 9)], None)
            coordinator.record(round_)
        return coordinator

    run(range(1, 3))  # killed after round 2
    resumed = run(range(3, 4))
    settings = ClientLevelConfig(1.0, 1.0, 3, 3, cfg.target_delta)
    assert resumed.summary()["releases"] == 3
    assert resumed.summary()["epsilon"] == pytest.approx(
        client_level_epsilon(settings, 3)["rdp"])  # as an uninterrupted 3-round run
    assert verify_ledger(resumed.ledger_path) == []
    with pytest.raises(ValueError, match="same settings"):
        ClientLevelRun(strategies.create("flora"), RunConfig(client_dp_noise=2.0), 3, 3,
                       tmp_path, run_id="other")
