"""FedPipe configurator: exact (= brute force), monotone in memory, clear when infeasible."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from silotune.planning.configurator import (
    GB,
    Grid,
    InfeasibleProfileError,
    enumerate_all,
    plan_federation,
    plan_silo,
    solve,
)
from silotune.planning.profiles import ProfileError, SiloProfile, mix_profiles, weakest
from silotune.planning.resources import CANDIDATES, Budget, Choice, ModelSpec, memory_bytes

# A 4-layer toy spec with the default model's proportions (d = 576, ffn = 1536, kv = 192).
SPEC = ModelSpec(num_params=40_000_000, vocab_size=49152, hidden_size=576, num_layers=4,
                 matrices={"q_proj": ((576, 576),) * 4, "k_proj": ((192, 576),) * 4,
                           "v_proj": ((192, 576),) * 4, "o_proj": ((576, 576),) * 4,
                           "gate_proj": ((1536, 576),) * 4, "up_proj": ((1536, 576),) * 4,
                           "down_proj": ((576, 1536),) * 4})
SMALL = Grid(ranks=(2, 8), batches=(4, 16), candidates=("q_proj", "v_proj", "up_proj"))


def _budget(memory_gb=1.0, seconds=600.0, gflops=50.0, mbps=10.0):
    return Budget(memory_bytes=memory_gb * GB, flops_per_second=gflops * 1e9,
                  upload_bytes_per_second=mbps * 1e6 / 8,
                  download_bytes_per_second=mbps * 1e6 / 8, round_seconds=seconds,
                  local_steps=5, seq_len=48)


def _importance(seed):
    rng = np.random.default_rng(seed)
    return dict(zip(CANDIDATES, rng.dirichlet(np.ones(len(CANDIDATES))), strict=True))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("memory_gb", [0.25, 0.4, 0.7, 1.5])
@pytest.mark.parametrize("seconds", [5.0, 60.0, 1e6])
def test_solver_equals_brute_force_enumeration(seed, memory_gb, seconds):
    importance, budget = _importance(seed), _budget(memory_gb, seconds)
    fast, brute = solve(SPEC, importance, budget, SMALL), enumerate_all(SPEC, importance,
                                                                        budget, SMALL)
    assert (fast is None) == (brute is None)
    if fast is not None and brute is not None:
        assert fast.choice == brute.choice
        assert fast.memory_bytes <= budget.memory_bytes and fast.seconds <= seconds


def test_solver_equals_brute_force_on_the_full_default_grid():
    importance, budget = _importance(7), _budget(0.6, 120.0)
    fast, brute = solve(SPEC, importance, budget, Grid()), enumerate_all(SPEC, importance,
                                                                         budget, Grid())
    assert fast is not None and brute is not None and fast.choice == brute.choice


@pytest.mark.parametrize("seed", range(4))
def test_more_memory_never_gives_a_worse_objective(seed):
    importance = _importance(seed)
    previous = None
    for memory_gb in np.linspace(0.2, 3.0, 15):
        best = solve(SPEC, importance, _budget(float(memory_gb), 60.0), Grid())
        if best is None:
            assert previous is None  # infeasible only below every feasible budget
            continue
        if previous is not None:
            assert best.objective(Grid()) >= previous.objective(Grid())
        previous = best
    assert previous is not None


def test_tight_memory_picks_bf16_and_loose_memory_everything():
    importance = _importance(0)
    tight = plan_silo("s", SPEC, importance, _budget(0.45, 1e6))  # fp32 needs >= 0.49
    loose = plan_silo("s", SPEC, importance, _budget(100.0, 1e6))
    assert tight.best.choice.precision == "bf16" and tight.binding == "memory"
    assert loose.best.choice == Choice(CANDIDATES, 16, 32, "fp32")
    assert loose.binding == "none (largest in the grid)"


def test_time_can_be_the_binding_constraint():
    planned = plan_silo("s", SPEC, _importance(1), _budget(100.0, seconds=20.0))
    assert "time" in planned.binding and planned.best.seconds <= 20.0


def test_infeasible_memory_names_the_constraint_and_the_key():
    with pytest.raises(InfeasibleProfileError, match=r"silo clinic.*memory.*memory-gb"):
        plan_silo("clinic", SPEC, _importance(0), _budget(memory_gb=0.01))


def test_infeasible_time_names_the_constraint_and_the_key():
    with pytest.raises(InfeasibleProfileError, match=r"time.*round-seconds") as err:
        plan_silo("s", SPEC, _importance(0), _budget(memory_gb=100.0, seconds=0.001))
    assert "memory:" not in str(err.value)


def test_uniform_plan_fits_the_weakest_silo_and_is_the_same_for_all():
    budgets = {"big": _budget(4.0, 1e6), "small": _budget(0.6, 1e6)}
    uniform = plan_federation(SPEC, _importance(2), budgets, mode="uniform")
    per_silo = plan_federation(SPEC, _importance(2), budgets)
    assert uniform["big"].best.choice == uniform["small"].best.choice
    assert uniform["small"].best.choice == per_silo["small"].best.choice
    assert per_silo["big"].best.objective(Grid()) > uniform["big"].best.objective(Grid())
    assert uniform["big"].best.memory_bytes <= 0.6 * GB


def test_memory_model_grows_with_batch_rank_targets_and_precision():
    base = Choice(("q_proj",), 4, 8, "bf16")
    m = memory_bytes(SPEC, base, 48)
    for bigger in (dataclasses.replace(base, batch=16), dataclasses.replace(base, rank=8),
                   dataclasses.replace(base, targets=("q_proj", "up_proj")),
                   dataclasses.replace(base, precision="fp32")):
        assert memory_bytes(SPEC, bigger, 48) > m
    # the base copy alone: fp32 is 4 bytes a parameter, bf16 2
    diff = memory_bytes(SPEC, dataclasses.replace(base, precision="fp32"), 48) - m
    assert diff >= 2 * SPEC.num_params


def test_profiles_mix_node_config_and_weakest():
    mix = mix_profiles("hospital-mix", 6)
    assert [p.name for p in mix[:4]] == ["research-hospital", "regional-hospital",
                                         "clinic-laptop", "regional-hospital"]
    assert mix[4] == mix[0]
    declared = SiloProfile.from_node_config(mix[2].to_node_config())
    assert declared == mix[2]
    assert SiloProfile.from_node_config({"seed": 1}) is None
    with pytest.raises(ProfileError, match="lacks"):
        SiloProfile.from_node_config({"memory-gb": 2})
    with pytest.raises(ProfileError, match=r"unknown profile mix 'x'.*hospital-mix"):
        mix_profiles("x", 2)
    low = weakest(mix)
    assert low.memory_gb == min(p.memory_gb for p in mix) and math.isfinite(low.gflops)


def test_silo_profile_from_node_config_or_mix():
    from silotune.config import RunConfig
    from silotune.simulations.silos import simulated_profile as silo_profile

    declared = mix_profiles("clinics", 1)[0].to_node_config()
    assert silo_profile(RunConfig(), 0, {}) is None  # auto-configuration off
    assert silo_profile(RunConfig(profiles="hospital-mix"), 2, {}).name == "clinic-laptop"
    assert silo_profile(RunConfig(profiles="node"), 0, declared).name == "clinic-laptop"
    with pytest.raises(ProfileError, match="node config declares none"):
        silo_profile(RunConfig(profiles="node"), 0, {"partition-id": 0})
    with pytest.raises(ProfileError, match=r"memory-gb = -1\.0 is out of range; allowed: "
                       "a finite number > 0"):
        SiloProfile("bad", -1.0, 1.0, 1.0, 1.0, 1.0)
