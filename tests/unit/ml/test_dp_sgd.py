"""The shared DP-SGD loop (silotune.ml.dp_sgd): step counting, seeded noise, and the SLM
training that now runs through it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from silotune.ml.dp_sgd import DPConfig, run_dp_sgd, run_sgd, sample_rate_for
from silotune.ml.slm import (
    SLMTrainConfig,
    labelled_dataset,
    load_slm,
    train_slm,
    trainable_state,
)
from tests.conftest import TOY_LABELS, toy_frame


def _linear_task(n: int = 32) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long())


def _train_linear(dp: DPConfig | None, batch_size: int, steps: int, physical: int = 4
                  ) -> tuple[dict[str, torch.Tensor], float]:
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = nn.Linear(5, 2)
    data = _linear_task()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(2))

    def loss_fn(batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    if dp is None:
        loss = run_sgd(opt, loader, steps, loss_fn)
    else:
        loss = run_dp_sgd(model, opt, loader, steps, loss_fn, dp, physical)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, loss


def test_sample_rate_is_one_over_the_number_of_batches():
    assert sample_rate_for(64, 16) == pytest.approx(1 / 4)
    assert sample_rate_for(65, 16) == pytest.approx(1 / 5)
    assert sample_rate_for(3, 16) == 1.0


def test_dp_sgd_without_noise_or_clipping_equals_sgd_on_the_full_batch():
    """q = 1: Poisson sampling takes every example, split into physical micro-batches."""
    plain, plain_loss = _train_linear(None, batch_size=32, steps=1)
    private, private_loss = _train_linear(DPConfig(0.0, 1e6), batch_size=32, steps=1,
                                          physical=5)
    for k in plain:
        torch.testing.assert_close(private[k], plain[k], rtol=1e-5, atol=1e-6)
    assert plain_loss > 0 and private_loss > 0


def test_dp_sgd_noise_seed_fixes_the_noise():
    def run(seed):
        return _train_linear(DPConfig(1.0, 1.0, noise_seed=seed), batch_size=8, steps=3)[0]

    a, b, c, os_a, os_b = run(3), run(3), run(4), run(None), run(None)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert any(not torch.equal(os_a[k], os_b[k]) for k in os_a)


def _train_slm_once(encoder_dir, noise_seed: int | None) -> dict[str, torch.Tensor]:
    model, tok = load_slm(encoder_dir, len(TOY_LABELS), train_layers=1, seed=1)
    df = toy_frame(48)
    private = labelled_dataset(tok, list(df.text), list(df.label), TOY_LABELS)
    synthetic = labelled_dataset(tok, list(df.text[:12]), list(df.label[:12]), TOY_LABELS)
    cfg = SLMTrainConfig(steps=4, batch_size=8, learning_rate=1e-2, synthetic_steps=2,
                         seed=3, physical_batch_size=4)
    dp = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=noise_seed)
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the encoder's dropout draws from the global RNG
        loss = train_slm(model, private, synthetic, cfg, dp)
    assert loss > 0
    return trainable_state(model)


def test_slm_dp_training_honours_the_noise_seed(tiny_encoder_dir):
    same, again = _train_slm_once(tiny_encoder_dir, 5), _train_slm_once(tiny_encoder_dir, 5)
    other = _train_slm_once(tiny_encoder_dir, 6)
    assert same.keys() == again.keys()
    assert all(torch.equal(same[k], again[k]) for k in same)
    assert any(not torch.equal(same[k], other[k]) for k in same)


def test_slm_dp_batches_are_secret_even_without_noise(tiny_encoder_dir):
    """Same public seeds, sigma 0: two SLM trainings still draw different batches."""
    def run() -> dict[str, torch.Tensor]:
        model, tok = load_slm(tiny_encoder_dir, len(TOY_LABELS), train_layers=1, seed=1)
        df = toy_frame(48)
        private = labelled_dataset(tok, list(df.text), list(df.label), TOY_LABELS)
        cfg = SLMTrainConfig(steps=3, batch_size=4, learning_rate=1e-2, seed=3)
        with torch.random.fork_rng():
            torch.manual_seed(0)  # the encoder's dropout draws from the global RNG
            train_slm(model, private, None, cfg, DPConfig(0.0, 1.0))
        return trainable_state(model)

    a, b = run(), run()
    assert any(not torch.equal(a[k], b[k]) for k in a)
