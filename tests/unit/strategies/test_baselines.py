"""Baseline aggregation rules against hand-computed values and the identities of
docs/algorithms.md §2.3, §3 and §10 (FedIT, zero-padding, HetLoRA, FlexLoRA, FFA-LoRA,
FedSA-LoRA)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from silotune.adapters.starts import frozen_a
from silotune.adapters.types import AdapterError, LoraFactors, SiloAdapter
from silotune.strategies.common import pad_factors, truncate_factors
from silotune.strategies.fedit import fedit_average
from silotune.strategies.fedsa import fedsa_average
from silotune.strategies.ffa import ffa_average
from silotune.strategies.flexlora import flexlora_dense, flexlora_redistribute, truncation_error
from silotune.strategies.flora import flora_stack
from silotune.strategies.hetlora import hetlora_aggregate, hetlora_prune_rank, hetlora_weights
from silotune.strategies.zeropad import zeropad_average

D_OUT, D_IN = 12, 10
TOL = {"rtol": 1e-10, "atol": 1e-12}


def _silo(name, n, s, a, b, module="m"):
    factors = LoraFactors(A=np.asarray(a, float), B=np.asarray(b, float))
    return SiloAdapter(silo=name, num_examples=n, scale=s, modules={module: factors})


def _toy(ranks=(4, 2, 2, 1), counts=(40, 30, 20, 10), scales=None, seed=0):
    rng = np.random.default_rng(seed)
    scales = [2.0] * len(ranks) if scales is None else scales  # alpha_k = 2 r_k
    return [_silo(f"s{k}", n, s, rng.normal(size=(r, D_IN)), rng.normal(size=(D_OUT, r)))
            for k, (r, n, s) in enumerate(zip(ranks, counts, scales, strict=True))]


def _p(adapters):
    n = np.array([a.num_examples for a in adapters], float)
    return n / n.sum()


def _ideal(adapters, module="m"):
    holders = [a for a in adapters if module in a.modules]
    return sum(pk * a.scale * a.modules[module].B @ a.modules[module].A
               for pk, a in zip(_p(holders), holders, strict=True))


def _product(f: LoraFactors):
    return f.B @ f.A


# ---------------------------------------------------------------- FedIT (§2.3, §10 #3-5)

def test_fedit_golden_two_silos_with_mixed_scale():
    # p = (0.25, 0.75), s = (1, 2): A = .25[1,2] + .75[0,4]; B = .25*1*[1,0] + .75*2*[2,1].
    adapters = [_silo("x", 1, 1.0, [[1.0, 2.0]], [[1.0], [0.0]]),
                _silo("y", 3, 2.0, [[0.0, 4.0]], [[2.0], [1.0]])]
    f = fedit_average(adapters)["m"]
    np.testing.assert_allclose(f.A, [[0.25, 3.5]])
    np.testing.assert_allclose(f.B, [[3.25], [1.5]])


def test_fedit_error_equals_cross_terms():
    adapters = _toy(ranks=(3, 3, 3, 3), scales=[1.0, 2.0, 0.5, 4.0])
    p = _p(adapters)
    bs = [a.scale * a.modules["m"].B for a in adapters]  # s folded into B
    as_ = [a.modules["m"].A for a in adapters]
    cross = sum(p[i] * p[j] * bs[i] @ as_[j] for i in range(4) for j in range(4) if i != j)
    own = sum(p[k] * (1 - p[k]) * bs[k] @ as_[k] for k in range(4))
    error = _product(fedit_average(adapters)["m"]) - _ideal(adapters)
    np.testing.assert_allclose(error, cross - own, **TOL)
    assert np.linalg.norm(error) > 1e-3  # inexact in general


def test_fedit_error_is_minus_covariance_from_common_start():
    rng = np.random.default_rng(1)
    a0, b0 = rng.normal(size=(3, D_IN)), rng.normal(size=(D_OUT, 3))
    da = [0.1 * rng.normal(size=a0.shape) for _ in range(4)]
    db = [0.1 * rng.normal(size=b0.shape) for _ in range(4)]
    adapters = [_silo(f"s{k}", n, 1.0, a0 + da[k], b0 + db[k])
                for k, n in enumerate((40, 30, 20, 10))]
    p = _p(adapters)
    da_bar, db_bar = sum(pk * d for pk, d in zip(p, da, strict=True)), sum(
        pk * d for pk, d in zip(p, db, strict=True))
    cov = sum(p[k] * (db[k] - db_bar) @ (da[k] - da_bar) for k in range(4))
    error = _product(fedit_average(adapters)["m"]) - _ideal(adapters)
    np.testing.assert_allclose(error, -cov, **TOL)


def _sgd_step(a, b, s, x, y, lr):
    """One SGD step on 0.5 ||s B A X - Y||_F^2."""
    resid = s * b @ a @ x - y  # (d_out, n)
    grad_b = s * resid @ (a @ x).T  # (d_out, r)
    grad_a = s * b.T @ resid @ x.T  # (r, d_in)
    return a - lr * grad_a, b - lr * grad_b, grad_a


def test_fedit_is_exact_one_sgd_step_from_zero_b_and_not_after_two():
    rng = np.random.default_rng(2)
    a0, b0, s = rng.normal(size=(3, D_IN)), np.zeros((D_OUT, 3)), 2.0
    data = [(rng.normal(size=(D_IN, 8)), rng.normal(size=(D_OUT, 8))) for _ in range(4)]
    one, two = [], []
    for k, (x, y) in enumerate(data):
        a1, b1, grad_a = _sgd_step(a0, b0, s, x, y, 0.05)
        assert not grad_a.any()  # grad wrt A is exactly zero at B = 0
        one.append(_silo(f"s{k}", 10 * (k + 1), s, a1, b1))
        a2, b2, _ = _sgd_step(a1, b1, s, x, y, 0.05)
        two.append(_silo(f"s{k}", 10 * (k + 1), s, a2, b2))
    err1 = _product(fedit_average(one)["m"]) - _ideal(one)
    err2 = _product(fedit_average(two)["m"]) - _ideal(two)
    assert np.abs(err1).max() < 1e-12
    assert np.abs(err2).max() > 1e-6


def test_fedit_rejects_unequal_ranks_and_partial_modules_renormalise():
    with pytest.raises(AdapterError, match="zeropad"):
        fedit_average(_toy())
    a, b = _toy(ranks=(2, 2), counts=(10, 30))
    only_b = SiloAdapter("s1", 30, b.scale, {**b.modules, "v": LoraFactors(np.ones((1, 3)),
                                                                           np.ones((4, 1)))})
    out = fedit_average([a, only_b])
    np.testing.assert_allclose(out["v"].B, b.scale * np.ones((4, 1)))  # p renormalised to 1
    with pytest.raises(AdapterError, match="at least one"):
        fedit_average([])


# ---------------------------------------------------------------- zero-padding (§3, §10 #7)

def test_pad_then_truncate_round_trips_exactly():
    f = _toy()[1].modules["m"]
    padded = pad_factors(f, 5)
    assert padded.A.shape == (5, D_IN) and padded.B.shape == (D_OUT, 5)
    assert not padded.A[2:].any() and not padded.B[:, 2:].any()
    np.testing.assert_array_equal(_product(padded), _product(f))
    back = truncate_factors(padded, 2)
    np.testing.assert_array_equal(back.A, f.A)
    np.testing.assert_array_equal(back.B, f.B)
    with pytest.raises(AdapterError, match="truncate"):
        pad_factors(f, 1)
    with pytest.raises(AdapterError):
        truncate_factors(f, 3)


def test_zeropad_golden_and_equals_fedit_for_equal_ranks():
    # r = (2, 1), p = (0.5, 0.5), s = (1, 3): padded A2 = [[5, 6], [0, 0]], B2 = [[1, 0]].
    adapters = [_silo("x", 1, 1.0, [[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0]]),
                _silo("y", 1, 3.0, [[5.0, 6.0]], [[1.0]])]
    f = zeropad_average(adapters)["m"]
    np.testing.assert_allclose(f.A, [[3.0, 4.0], [1.5, 2.0]])
    np.testing.assert_allclose(f.B, [[2.0, 0.5]])
    equal = _toy(ranks=(3, 3, 3), counts=(5, 1, 2), scales=[1.0, 2.0, 3.0])
    padded, fedit = zeropad_average(equal)["m"], fedit_average(equal)["m"]
    np.testing.assert_array_equal(padded.A, fedit.A)
    np.testing.assert_array_equal(padded.B, fedit.B)


def test_zeropad_is_inexact_with_heterogeneous_ranks_and_checks_weights():
    adapters = _toy()
    err = np.linalg.norm(_product(zeropad_average(adapters)["m"]) - _ideal(adapters))
    assert err / np.linalg.norm(_ideal(adapters)) > 0.1
    custom = zeropad_average(adapters, np.array([1.0, 0.0, 0.0, 0.0]))["m"]
    np.testing.assert_allclose(_product(custom), 2.0 * _product(adapters[0].modules["m"]))
    with pytest.raises(AdapterError, match="one per adapter"):
        zeropad_average(adapters, np.ones(3))
    bad = _silo("z", 1, 1.0, np.ones((4, D_IN + 1)), np.ones((D_OUT, 4)))
    with pytest.raises(AdapterError, match="d_out, d_in"):
        zeropad_average([*adapters, bad])


# ---------------------------------------------------------------- HetLoRA (§3, §10 #11)

def test_hetlora_weights_are_normalised_update_norms():
    adapters = _toy(scales=[1.0, 2.0, 0.5, 3.0])
    w = hetlora_weights(adapters, "m")
    norms = np.array([np.linalg.norm(a.scale * _product(a.modules["m"])) for a in adapters])
    np.testing.assert_allclose(w, norms / norms.sum(), **TOL)
    assert w.sum() == pytest.approx(1.0)
    # golden: ||1 [1; 0][3 4]||_F = 5 and ||3 [1; 0][0 5]||_F = 15 -> (0.25, 0.75)
    two = [_silo("x", 1, 1.0, [[3.0, 4.0]], [[1.0], [0.0]]),
           _silo("y", 9, 3.0, [[0.0, 5.0]], [[1.0], [0.0]])]
    np.testing.assert_allclose(hetlora_weights(two, "m"), [0.25, 0.75])
    expect = zeropad_average(adapters, w)["m"]
    got = hetlora_aggregate(adapters)["m"]
    np.testing.assert_allclose(got.A, expect.A, **TOL)
    np.testing.assert_allclose(got.B, expect.B, **TOL)


def test_hetlora_weights_skip_non_holders_and_fall_back_to_counts():
    a, b = _toy(ranks=(2, 2), counts=(10, 30))
    extra = SiloAdapter("s1", 30, 1.0, {**b.modules, "v": LoraFactors(np.ones((1, 3)),
                                                                      np.ones((4, 1)))})
    np.testing.assert_allclose(hetlora_weights([a, extra], "v"), [0.0, 1.0])
    zero_b = [_silo(f"s{k}", n, 1.0, np.ones((2, 3)), np.zeros((4, 2)))
              for k, n in enumerate((10, 30))]
    np.testing.assert_allclose(hetlora_weights(zero_b, "m"), [0.25, 0.75])
    with pytest.raises(AdapterError, match="no adapter"):
        hetlora_weights(zero_b, "absent")


def test_hetlora_prune_rank():
    a = np.diag([1.0, 1.0, 2.0, 3.0])  # (4, 4): row i has norm a[i, i]
    b = np.diag([1.0, 1.0, 1.0, 2.0])  # (4, 4): column j has norm b[j, j]
    f = LoraFactors(A=a, B=b)
    tail = np.sqrt(5.0) * np.sqrt(13.0)  # gamma = 0.5: ||B[:, 2:4]|| ||A[2:4]||
    assert hetlora_prune_rank(f, 4, 0.5) == (4, pytest.approx(tail))  # first round: keep
    assert hetlora_prune_rank(f, 4, 0.5, previous_tail_norm=100.0) == (2, pytest.approx(tail))
    assert hetlora_prune_rank(f, 4, 0.5, previous_tail_norm=1.0)[0] == 4  # tail grew
    assert hetlora_prune_rank(f, 4, 0.99, previous_tail_norm=100.0) == (3, pytest.approx(6.0))
    assert hetlora_prune_rank(f, 1, 0.99, previous_tail_norm=100.0)[0] == 1  # never below 1
    with pytest.raises(AdapterError):
        hetlora_prune_rank(f, 5)
    with pytest.raises(ValueError, match="gamma"):
        hetlora_prune_rank(f, 4, gamma=0.0)


# ---------------------------------------------------------------- FlexLoRA (§3, §10 #9)

def test_flexlora_dense_is_exact_and_svd_meets_eckart_young():
    adapters = _toy()
    dense = flexlora_dense(adapters)["m"]
    np.testing.assert_allclose(dense, _ideal(adapters), **TOL)
    for r in (1, 2, 4, 9):
        f = flexlora_redistribute(dense, r)
        assert f.A.shape == (r, D_IN) and f.B.shape == (D_OUT, r)
        err = np.linalg.norm(dense - _product(f))
        assert err == pytest.approx(truncation_error(dense, r), rel=1e-9, abs=1e-12)
    assert truncation_error(dense, 9) == pytest.approx(0.0, abs=1e-12)  # rank(dense) <= 9
    full = flexlora_redistribute(dense, 12)  # above min(d_out, d_in): zero-padded
    assert full.rank == 12 and not full.A[D_IN:].any()
    np.testing.assert_allclose(_product(full), dense, atol=1e-12)


def test_flexlora_golden_diagonal():
    dense = np.diag([3.0, 1.0])
    f = flexlora_redistribute(dense, 1)
    np.testing.assert_allclose(_product(f), np.diag([3.0, 0.0]), atol=1e-15)
    assert truncation_error(dense, 1) == pytest.approx(1.0)
    assert truncation_error(dense, 2) == 0.0
    with pytest.raises(AdapterError):
        flexlora_redistribute(dense, 0)


# ---------------------------------------------------------------- FFA-LoRA (§3, §10 #6)

def test_frozen_a_is_deterministic_prefix_consistent_and_bounded():
    big = frozen_a(7, "q_proj", 8, 16)
    assert big.shape == (8, 16) and big.dtype == np.float32
    np.testing.assert_array_equal(big, frozen_a(7, "q_proj", 8, 16))
    np.testing.assert_array_equal(frozen_a(7, "q_proj", 3, 16), big[:3])
    assert not np.array_equal(frozen_a(7, "v_proj", 8, 16), big)
    assert not np.array_equal(frozen_a(8, "q_proj", 8, 16), big)
    assert np.abs(big).max() <= 0.25 and big.any()  # Kaiming-uniform bound 1/sqrt(16)


def _ffa_silos(ranks, counts, scales, seed, rng, d_out=D_OUT, d_in=D_IN):
    return [_silo(f"s{k}", n, s, frozen_a(seed, "m", r, d_in), rng.normal(size=(d_out, r)))
            for k, (r, n, s) in enumerate(zip(ranks, counts, scales, strict=True))]


def test_ffa_keeps_a_and_is_exact():
    adapters = _ffa_silos((4, 2, 2, 1), (40, 30, 20, 10), (2.0, 1.0, 0.5, 2.0), 3,
                          np.random.default_rng(3))
    a0 = frozen_a(3, "m", 4, D_IN)
    out = ffa_average(adapters)["m"]
    np.testing.assert_array_equal(out.A, a0)
    assert out.A is not adapters[0].modules["m"].A
    np.testing.assert_allclose(out.B @ out.A, _ideal(adapters), **TOL)


def test_ffa_rejects_a_that_moved():
    adapters = _ffa_silos((2, 2), (1, 1), (1.0, 1.0), 0, np.random.default_rng(0))
    moved = adapters[1].modules["m"].A.copy()
    moved[0, 0] += 1e-6
    bad = _silo("s1", 1, 1.0, moved, adapters[1].modules["m"].B)
    with pytest.raises(AdapterError, match="A must stay frozen"):
        ffa_average([adapters[0], bad])


# ---------------------------------------------------------------- FedSA-LoRA (§3)

def test_fedsa_averages_a_only():
    adapters = _toy(ranks=(3, 3, 3), counts=(1, 1, 2), scales=[1.0, 5.0, 2.0])
    b_before = [a.modules["m"].B.copy() for a in adapters]
    shared = fedsa_average(adapters)
    expect = sum(pk * a.modules["m"].A for pk, a in zip(_p(adapters), adapters, strict=True))
    np.testing.assert_allclose(shared["m"], expect, **TOL)
    for a, b in zip(adapters, b_before, strict=True):
        np.testing.assert_array_equal(a.modules["m"].B, b)
    nan_b = [_silo(a.silo, a.num_examples, a.scale, a.modules["m"].A,
                   np.full((D_OUT, 3), np.nan)) for a in adapters]
    np.testing.assert_array_equal(fedsa_average(nan_b)["m"], shared["m"])  # B never read
    with pytest.raises(AdapterError, match="equal ranks"):
        fedsa_average(_toy())


# ---------------------------------------------------------------- properties

@st.composite
def federations(draw, equal_ranks=False):
    """(adapters, ffa_adapters): 1-5 silos, modules 'm' (all) and 'v' (a subset)."""
    k = draw(st.integers(1, 5))
    d_out, d_in = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    ranks = [draw(st.integers(1, 4))] * k if equal_ranks else draw(
        st.lists(st.integers(1, 4), min_size=k, max_size=k))
    counts = draw(st.lists(st.integers(1, 100), min_size=k, max_size=k))
    scales = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 4.0]), min_size=k, max_size=k))
    has_v = [True, *draw(st.lists(st.booleans(), min_size=k - 1, max_size=k - 1))]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def build(frozen):
        silos = []
        for i in range(k):
            mods = {}
            for name, dims in (("m", (d_out, d_in)), ("v", (d_in, d_out))):
                if name == "v" and not has_v[i]:
                    continue
                a = (frozen_a(seed, name, ranks[i], dims[1], dtype=np.float64) if frozen
                     else rng.normal(size=(ranks[i], dims[1])))
                mods[name] = LoraFactors(A=a, B=rng.normal(size=(dims[0], ranks[i])))
            silos.append(SiloAdapter(f"s{i}", counts[i], scales[i], mods))
        return silos

    return build(False), build(True)


def _arrays(adapters):
    return [x for a in adapters for f in a.modules.values() for x in (f.A, f.B)]


def _outputs(adapters, ffa_adapters):
    outs: list = [zeropad_average(adapters), hetlora_aggregate(adapters), flexlora_dense(adapters),
                  ffa_average(ffa_adapters)]
    outs.append({m: flexlora_redistribute(d, 2) for m, d in outs[2].items()})
    if len({f.rank for a in adapters for f in a.modules.values()}) == 1:
        outs += [fedit_average(adapters), fedsa_average(adapters)]
    else:
        for rule in (fedit_average, fedsa_average):
            with pytest.raises(AdapterError):
                rule(adapters)
    return [x for o in outs for v in o.values()
            for x in ((v.A, v.B) if isinstance(v, LoraFactors) else (v,))]


@settings(max_examples=50, deadline=None)
@given(fed=federations(), equal=st.booleans(), fed_eq=federations(equal_ranks=True))
def test_property_inputs_never_mutated_nor_aliased(fed, equal, fed_eq):
    adapters, ffa_adapters = fed_eq if equal else fed
    before = copy.deepcopy(adapters), copy.deepcopy(ffa_adapters)
    outputs = _outputs(adapters, ffa_adapters)
    for now, was in ((adapters, before[0]), (ffa_adapters, before[1])):
        for x, y in zip(_arrays(now), _arrays(was), strict=True):
            np.testing.assert_array_equal(x, y)
    inputs = _arrays(adapters) + _arrays(ffa_adapters)
    assert not any(np.shares_memory(o, i) for o in outputs for i in inputs)


@settings(max_examples=50, deadline=None)
@given(fed=federations())
def test_property_exact_rules(fed):
    adapters, ffa_adapters = fed
    flora, ffa, dense = flora_stack(adapters), ffa_average(ffa_adapters), flexlora_dense(adapters)
    for module in ("m", "v"):
        np.testing.assert_allclose(flora.dense(module), _ideal(adapters, module), **TOL)
        np.testing.assert_allclose(_product(ffa[module]), _ideal(ffa_adapters, module), **TOL)
        np.testing.assert_allclose(dense[module], _ideal(adapters, module), **TOL)
        w = hetlora_weights(adapters, module)
        assert w.sum() == pytest.approx(1.0) and np.all(w >= 0)


@settings(max_examples=50, deadline=None)
@given(fed=federations(equal_ranks=True))
def test_property_fedit_error_identity(fed):
    adapters = fed[0]
    p = _p(adapters)
    bs = [a.scale * a.modules["m"].B for a in adapters]
    as_ = [a.modules["m"].A for a in adapters]
    k = len(adapters)
    expect = sum((p[i] * p[j] * bs[i] @ as_[j] for i in range(k) for j in range(k) if i != j),
                 start=np.zeros_like(bs[0] @ as_[0]))
    expect = expect - sum(p[i] * (1 - p[i]) * bs[i] @ as_[i] for i in range(k))
    error = _product(fedit_average(adapters)["m"]) - _ideal(adapters)
    np.testing.assert_allclose(error, expect, rtol=1e-9, atol=1e-11)
    zp = zeropad_average(adapters)["m"]
    np.testing.assert_array_equal(_product(zp), _product(fedit_average(adapters)["m"]))


def test_factored_svd_equals_dense_svd_truncation():
    from silotune.strategies.flexlora import factored_svd, flexlora_redistribute

    rng = np.random.default_rng(3)
    f = LoraFactors(A=rng.normal(size=(5, 12)), B=rng.normal(size=(9, 5)))
    for keep in (1, 3, 5, 7):
        fast, slow = factored_svd(f, keep), flexlora_redistribute(f.B @ f.A, keep)
        np.testing.assert_allclose(fast.B @ fast.A, slow.B @ slow.A, atol=1e-10)
        assert fast.A.shape == (keep, 12) and fast.B.shape == (9, keep)
