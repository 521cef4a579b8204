"""Partial-weights aggregation (FedPipe): a matrix trained by only some silos is
aggregated over exactly those silos, with p_k renormalised over them (acceptance 3)."""

from __future__ import annotations

import numpy as np
import pytest

from silotune import strategies
from silotune.adapters.starts import seeded_start
from silotune.adapters.types import AdapterError, LoraFactors, SiloAdapter, peft_key
from silotune.server.exchange import restrict, shapes_of
from silotune.server.validate import Expected, validate_reply
from silotune.strategies.flora import flora_stack

Q, V, OP = "layers.0.q_proj", "layers.0.v_proj", "layers.0.o_proj"
SHAPES = {Q: (6, 5), V: (4, 5), OP: (5, 6)}


def _factors(rng, rank, module):
    d_out, d_in = SHAPES[module]
    return LoraFactors(A=rng.normal(size=(rank, d_in)), B=rng.normal(size=(d_out, rank)))


def _silos():
    """s0 trains q and v (n=10), s1 only v (n=30), s2 q and o (n=60)."""
    rng = np.random.default_rng(1)
    plan = {"s0": ((Q, V), 10, 2, 2.0), "s1": ((V,), 30, 4, 2.0), "s2": ((Q, OP), 60, 1, 3.0)}
    return [SiloAdapter(s, n, scale, {m: _factors(rng, r, m) for m in mods})
            for s, (mods, n, r, scale) in plan.items()]


def _dense(f: LoraFactors) -> np.ndarray:
    return f.B @ f.A


def test_each_matrix_is_stacked_over_exactly_its_silos():
    adapters = _silos()
    update = flora_stack(adapters)
    by = {a.silo: a for a in adapters}
    # v: s0 (n=10) and s1 (n=30) only: p = (0.25, 0.75), s2's 60 examples do not count
    want_v = 0.25 * 2.0 * _dense(by["s0"].modules[V]) + 0.75 * 2.0 * _dense(by["s1"].modules[V])
    np.testing.assert_allclose(update.dense(V), want_v, atol=1e-12)
    # q: s0 (n=10) and s2 (n=60): p = (1/7, 6/7)
    want_q = (1 / 7) * 2.0 * _dense(by["s0"].modules[Q]) \
        + (6 / 7) * 3.0 * _dense(by["s2"].modules[Q])
    np.testing.assert_allclose(update.dense(Q), want_q, atol=1e-12)
    # o: s2 alone gets weight 1, whatever the other silos' example counts
    np.testing.assert_allclose(update.dense(OP), 3.0 * _dense(by["s2"].modules[OP]),
                               atol=1e-12)
    # the stacked rank of each module is the sum over its holders only
    assert update.modules[V].rank == 2 + 4 and update.modules[Q].rank == 2 + 1
    assert update.modules[OP].rank == 1


def test_a_silo_without_a_module_leaves_it_unchanged():
    adapters = _silos()
    without_s1 = flora_stack([a for a in adapters if a.silo != "s1"])
    with_s1 = flora_stack(adapters)
    # s1 trains only v: q and o are identical with or without it
    for module in (Q, OP):
        np.testing.assert_array_equal(with_s1.dense(module), without_s1.dense(module))


def test_flora_rule_aggregates_partial_replies():
    rule = strategies.create("flora")
    rule.setup({"s0": 2, "s1": 4, "s2": 1}, SHAPES, seed=0)
    result = rule.aggregate(_silos(), None)
    assert result.merge is not None and set(result.merge.modules) == {Q, V, OP}


def test_validation_accepts_a_silo_that_trains_only_its_assigned_modules():
    shapes = shapes_of(SHAPES, ("v_proj",))
    assert shapes == {V: SHAPES[V]}
    arrays = {peft_key(V, "A"): np.full((4, 5), 0.1, np.float32),
              peft_key(V, "B"): np.full((4, 4), 0.1, np.float32)}
    adapter = validate_reply("s1", arrays, 30, Expected(rank=4, scale=2.0, shapes=shapes))
    assert set(adapter.modules) == {V}
    # ...but a module outside its assignment is rejected
    extra = {**arrays, peft_key(Q, "A"): np.zeros((4, 5), np.float32),
             peft_key(Q, "B"): np.zeros((6, 4), np.float32)}
    with pytest.raises(AdapterError, match="unexpected"):
        validate_reply("s1", extra, 30, Expected(rank=4, scale=2.0, shapes=shapes))


def test_seeded_start_is_restricted_to_the_silos_modules_with_the_same_values():
    rule = strategies.create("flora")
    rule.setup({"s": 4}, SHAPES, seed=3)
    full = rule.plan("s", 4, None, 1)
    mine = restrict(full, shapes_of(SHAPES, ("q_proj", "o_proj")))
    assert mine.init is not None and full.init is not None and mine.seed == full.seed
    assert set(mine.init) == {Q, OP}
    # what the silo regenerates from its own targets equals the coordinator's restriction
    regenerated = seeded_start({Q: SHAPES[Q], OP: SHAPES[OP]}, 4, full.seed)
    for m in (Q, OP):
        np.testing.assert_array_equal(regenerated.modules[m].A, mine.init[m].A)
