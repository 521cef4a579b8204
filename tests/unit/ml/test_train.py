"""Local training: plain vs DP-SGD, liveness, and no-noise/no-clip DP equals plain."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silotune.ml.dp_sgd import DPConfig
from silotune.ml.lm import encode, load_model
from silotune.ml.train import LocalTrainConfig, train_local
from tests.conftest import toy_frame


def _examples(tok, n=64):
    df = toy_frame(n)
    return [encode(tok, t, lab) for t, lab in zip(df.text, df.label, strict=True)]


def _cfg(**kw):
    base = dict(rank=4, alpha=8.0, targets=("q_proj", "v_proj"), local_steps=3,
                batch_size=16, physical_batch_size=16, learning_rate=1e-2, init_seed=7)
    base.update(kw)
    return LocalTrainConfig(**base)


def test_plain_training_moves_lora_and_is_deterministic(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    ex = _examples(tok)
    a = train_local(model, ex, tok.pad_token_id, _cfg(), dp=None)
    b = train_local(model, ex, tok.pad_token_id, _cfg(), dp=None)
    assert a.liveness > 0 and a.steps == 3
    assert a.adapter.keys() == b.adapter.keys()
    for k in a.adapter:
        np.testing.assert_array_equal(a.adapter[k], b.adapter[k])
    assert all("lora_A" in k or "lora_B" in k for k in a.adapter)


def test_base_model_is_not_modified(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_local(model, _examples(tok), tok.pad_token_id, _cfg(), dp=None)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_dp_without_noise_or_clipping_equals_plain_sgd_step(tiny_model_dir):
    """One full-batch step: DP-SGD with sigma=0 and a huge clip norm is plain SGD.

    With q = 1 (batch covers the data) Poisson sampling includes every example with
    probability 1, so the batch is the same as in the plain run.
    """
    model, tok = load_model(tiny_model_dir)
    ex = _examples(tok, n=24)
    cfg = _cfg(local_steps=1, batch_size=len(ex), physical_batch_size=len(ex))
    plain = train_local(model, ex, tok.pad_token_id, cfg, dp=None)
    private = train_local(model, ex, tok.pad_token_id, cfg,
                          dp=DPConfig(noise_multiplier=0.0, max_grad_norm=1e6))
    assert private.sample_rate == 1.0
    for k in plain.adapter:
        np.testing.assert_allclose(private.adapter[k], plain.adapter[k], rtol=1e-4, atol=1e-6)


def test_dp_training_counts_logical_steps(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    ex = _examples(tok)
    res = train_local(model, ex, tok.pad_token_id, _cfg(local_steps=4, physical_batch_size=4),
                      dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    assert res.steps == 4
    assert res.sample_rate == pytest.approx(1 / 4)
    assert res.liveness > 0


def test_dp_noise_is_os_seeded_unless_a_simulation_seeds_it(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    ex = _examples(tok)

    def run(noise_seed):
        dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=noise_seed)
        return train_local(model, ex, tok.pad_token_id, _cfg(), dp=dp).adapter

    same, again, other, os_a, os_b = run(11), run(11), run(12), run(None), run(None)
    for k in same:  # same public seed and data order: the very same noise
        np.testing.assert_array_equal(same[k], again[k])
    for a, b in ((same, other), (os_a, os_b)):  # else the noise differs
        assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_dp_batches_are_secret_even_without_noise(tiny_model_dir):
    """With sigma 0 only the Poisson batches differ between two trainings that share every
    public seed: they must (the batches come from the silo's OS randomness), unless a
    simulation seeds them, and then the pair is reproducible."""
    model, tok = load_model(tiny_model_dir)
    ex = _examples(tok)

    def run(seed):
        dp = DPConfig(noise_multiplier=0.0, max_grad_norm=1.0, noise_seed=seed)
        return train_local(model, ex, tok.pad_token_id, _cfg(batch_size=4), dp=dp).adapter

    a, b = run(None), run(None)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    seeded, again = run(7), run(7)
    assert all(np.array_equal(seeded[k], again[k]) for k in seeded)
