"""FLoRA stacking against hand-computed values (docs/algorithms.md §2.1, §10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silotune import strategies
from silotune.adapters.codec import update_from_arrays, update_to_arrays
from silotune.adapters.types import (
    AdapterError,
    LoraFactors,
    LowRankUpdate,
    SiloAdapter,
    modules_from_peft,
    peft_key,
)
from silotune.ml.merge import apply_update
from silotune.strategies.flora import flora_stack

D_OUT, D_IN = 12, 10


def _toy(ranks=(4, 2, 2, 1), counts=(40, 30, 20, 10), alpha_per_rank=None, seed=0):
    rng = np.random.default_rng(seed)
    adapters = []
    for k, (r, n) in enumerate(zip(ranks, counts, strict=True)):
        alpha = 2.0 * r if alpha_per_rank is None else alpha_per_rank[k]
        adapters.append(SiloAdapter(
            silo=f"s{k}", num_examples=n, scale=alpha / r,
            modules={"m": LoraFactors(A=rng.normal(size=(r, D_IN)),
                                      B=rng.normal(size=(D_OUT, r)))}))
    return adapters


def _ideal(adapters):
    p = np.array([a.num_examples for a in adapters], float)
    p /= p.sum()
    return sum(pk * a.scale * a.modules["m"].B @ a.modules["m"].A
               for pk, a in zip(p, adapters, strict=True))


def test_stacking_equals_weighted_sum_with_mixed_ranks():
    adapters = _toy()
    update = flora_stack(adapters)
    assert update.modules["m"].rank == 9  # R = 4 + 2 + 2 + 1, from the tensors
    np.testing.assert_allclose(update.dense("m"), _ideal(adapters), rtol=0, atol=1e-12)


def test_stacking_is_exact_with_unequal_alpha():
    adapters = _toy(alpha_per_rank=[16.0, 3.0, 1.0, 32.0])
    np.testing.assert_allclose(flora_stack(adapters).dense("m"), _ideal(adapters), atol=1e-12)


def test_weights_multiply_a_only_golden_two_silos():
    # Hand-computed: p = (0.25, 0.75), s = 1: dW = 0.25*B1A1 + 0.75*B2A2.
    a1, b1 = np.array([[1.0, 2.0]]), np.array([[1.0], [0.0]])
    a2, b2 = np.array([[0.0, 4.0]]), np.array([[2.0], [1.0]])
    adapters = [SiloAdapter("x", 1, 1.0, {"m": LoraFactors(a1, b1)}),
                SiloAdapter("y", 3, 1.0, {"m": LoraFactors(a2, b2)})]
    update = flora_stack(adapters)
    np.testing.assert_array_equal(update.modules["m"].B, np.array([[1.0, 2.0], [0.0, 1.0]]))
    np.testing.assert_allclose(update.dense("m"), np.array([[0.25, 6.5], [0.0, 3.0]]))


def test_partial_modules_aggregate_over_their_holders_only():
    adapters = _toy(ranks=(2, 2), counts=(10, 30))
    extra = SiloAdapter("s0", 10, 1.0, {**adapters[0].modules,
                                         "only0": LoraFactors(np.ones((2, 3)), np.ones((4, 2)))})
    update = flora_stack([extra, adapters[1]])
    np.testing.assert_allclose(update.dense("only0"), np.ones((4, 2)) @ np.ones((2, 3)))


def test_inputs_are_not_mutated():
    adapters = _toy()
    before = [a.modules["m"].A.copy() for a in adapters]
    flora_stack(adapters)
    for a, b in zip(adapters, before, strict=True):
        np.testing.assert_array_equal(a.modules["m"].A, b)


def test_registry_rejects_unknown_names():
    assert strategies.create("flora").name == "flora"
    valid = "fedit, fedsa, ffa, flexlora, flora, hetlora, zeropad"
    with pytest.raises(strategies.UnknownStrategyError, match=f"valid strategies: {valid}"):
        strategies.create("fedavg-typo")


def test_peft_keys_round_trip_and_reject_malformed():
    arrays = {peft_key("model.layers.0.q_proj", "A"): np.zeros((2, 5)),
              peft_key("model.layers.0.q_proj", "B"): np.zeros((3, 2))}
    assert modules_from_peft(arrays)["model.layers.0.q_proj"].rank == 2
    with pytest.raises(AdapterError, match="no lora_B"):
        modules_from_peft({peft_key("q", "A"): np.zeros((2, 5))})
    with pytest.raises(AdapterError, match="rank-r pair"):
        modules_from_peft({peft_key("q", "A"): np.zeros((2, 5)),
                           peft_key("q", "B"): np.zeros((3, 4))})
    with pytest.raises(AdapterError, match="not a LoRA factor"):
        modules_from_peft({"model.embed_tokens.weight": np.zeros((2, 2))})


def test_silo_that_missed_rounds_replays_to_the_exact_global_base():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D_IN, D_OUT, bias=False))
    original = net[0].weight.detach().clone()
    late = torch.nn.Sequential(torch.nn.Linear(D_IN, D_OUT, bias=False))
    late.load_state_dict(net.state_dict())
    rounds = []
    for seed in range(3):
        upd = flora_stack(_toy(seed=seed))
        wire = update_to_arrays(LowRankUpdate({"0": upd.modules["m"]}), f"round-{seed}/")
        rounds.append(update_from_arrays(wire, f"round-{seed}/", 1.0))
        apply_update(net, rounds[-1])  # the coordinator, every round
    for upd in rounds:  # the silo, which was away, replays all rounds later
        apply_update(late, upd)
    assert torch.equal(net[0].weight, late[0].weight)  # bit-identical
    expected = original.double().numpy() + sum(u.dense("0") for u in rounds)
    np.testing.assert_allclose(net[0].weight.detach().double().numpy(), expected, atol=1e-4)
    assert not np.allclose(original.numpy(), net[0].weight.detach().numpy())
