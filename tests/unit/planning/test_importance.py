"""FedPipe importance: AdaLoRA smoothing (golden values), aggregation, scoring on a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silotune.ml.lm import encode, load_model
from silotune.planning.importance import (
    aggregate_importance,
    importance_by_type,
    smoothed_sensitivity,
)
from silotune.planning.resources import CANDIDATES
from silotune.planning.sensitivity import model_spec, raw_sensitivities
from tests.conftest import toy_frame


def test_smoothing_golden_values():
    # Hand-computed with beta = 0.85 from zero:
    # t1: I_bar = 0.15*2 = 0.3,  U_bar = 0.15*|2-0.3| = 0.255
    # t2: I_bar = 0.85*0.3 + 0.15*4 = 0.855, U_bar = 0.85*0.255 + 0.15*|4-0.855| = 0.6885
    raw = np.array([[2.0, 1.0], [4.0, 1.0]])
    got = smoothed_sensitivity(raw)
    i2 = 0.855
    u_const = 0.85 * (0.15 * 0.85) + 0.15 * abs(1.0 - (0.85 * 0.15 + 0.15))
    np.testing.assert_allclose(got, [i2 * 0.6885, (0.85 * 0.15 + 0.15) * u_const],
                               rtol=1e-12)


def test_smoothing_rejects_bad_shapes():
    with pytest.raises(ValueError, match="steps >= 1"):
        smoothed_sensitivity(np.zeros(3))


def test_aggregation_normalises_each_silo_then_weights_by_examples():
    # silo A (n=1): q 3, v 1 -> 0.75, 0.25; silo B (n=3): q 10, v 30 -> 0.25, 0.75
    out = aggregate_importance([(1, {"l.0.q_proj": 3.0, "l.0.v_proj": 1.0}),
                                (3, {"l.0.q_proj": 10.0, "l.0.v_proj": 30.0})])
    assert out == pytest.approx({"l.0.q_proj": 0.25 * 0.75 + 0.75 * 0.25,
                                 "l.0.v_proj": 0.25 * 0.25 + 0.75 * 0.75})
    assert importance_by_type({"a.0.q_proj": 1.0, "a.1.q_proj": 2.0, "a.0.v_proj": 4.0}) \
        == {"q_proj": 3.0, "v_proj": 4.0}
    with pytest.raises(ValueError, match="positive example count"):
        aggregate_importance([(0, {"m": 1.0})])


def test_scores_every_candidate_matrix_and_leaves_the_model_unchanged(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    df = toy_frame(40)
    ex = [encode(tok, t, lab) for t, lab in zip(df.text, df.label, strict=True)]
    raw = raw_sensitivities(model, ex, tok.pad_token_id, batch_size=8, steps=3, seed=0)
    assert len(raw) == 2 * len(CANDIDATES)  # 2 layers x 7 matrix types
    assert all(v.shape == (3,) and (v > 0).all() for v in raw.values())
    again = raw_sensitivities(model, ex, tok.pad_token_id, 8, 3, 0)
    for name, values in raw.items():  # the public seed fixes the calibration batches
        np.testing.assert_allclose(values, again[name], rtol=1e-6)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_a_zero_matrix_has_zero_sensitivity(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    name = "model.layers.1.self_attn.o_proj"
    with torch.no_grad():
        model.get_submodule(name).weight.zero_()
    df = toy_frame(16)
    ex = [encode(tok, t, lab) for t, lab in zip(df.text, df.label, strict=True)]
    raw = raw_sensitivities(model, ex, tok.pad_token_id, batch_size=8, steps=2, seed=0)
    assert (raw[name] == 0).all() and (raw["model.layers.0.self_attn.o_proj"] > 0).all()


def test_model_spec_of_the_tiny_model(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    spec = model_spec(model)
    assert spec.num_layers == 2 and set(spec.matrices) == set(CANDIDATES)
    assert spec.matrices["k_proj"] == ((16, 32), (16, 32))  # 2 kv heads x head_dim 8
    assert spec.num_params == sum(p.numel() for p in model.parameters())
