"""FedPipe importance as a DP statistic: per-example clipping, Poisson sampling, noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silotune.ml.lm import (
    MAX_LENGTH,
    EncodedExample,
    collate,
    encode,
    load_model,
    per_sequence_loss,
)
from silotune.planning.importance import smoothed_sensitivity
from silotune.planning.resources import CANDIDATES
from silotune.planning.sensitivity import (
    DP_SCORE_FLOOR,
    dp_raw_sensitivities,
    dp_silo_importance,
)
from tests.conftest import toy_frame

N = 12


@pytest.fixture()
def setup(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    df = toy_frame(N)
    ex = [encode(tok, t, lab) for t, lab in zip(df.text, df.label, strict=True)]
    return model, int(tok.pad_token_id), ex


def dp(model, ex, pad_id, *, clip, noise, seed, batch_size=N, steps=3):
    return dp_raw_sensitivities(model, ex, pad_id, batch_size=batch_size, steps=steps,
                                clip=clip, noise_multiplier=noise,
                                generator=torch.Generator().manual_seed(seed))


def as_matrix(raw: dict[str, np.ndarray]) -> np.ndarray:
    return np.stack([raw[n] for n in sorted(raw)], axis=1)  # (steps, M)


def reference_scores(model: torch.nn.Module, names: list[str],
                     examples: list[EncodedExample], pad_id: int) -> np.ndarray:
    """(n, M): sum |W * dL_i/dW| of each matrix, one example at a time."""
    weights = [model.get_submodule(n).weight for n in names]
    rows = []
    for e in examples:
        batch = collate([e], pad_id)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        grads = torch.autograd.grad(per_sequence_loss(out.logits, batch["labels"]), weights)
        rows.append([float((w.detach() * g).abs().sum()) for w, g in zip(weights, grads,
                                                                          strict=True)])
    return np.array(rows)


def test_without_noise_or_clipping_the_statistic_is_the_mean_per_example_score(setup):
    model, pad_id, ex = setup
    raw = dp(model, ex, pad_id, clip=1e12, noise=0.0, seed=0)  # q = 1: every example
    names = sorted(raw)
    assert len(names) == 2 * len(CANDIDATES)
    mean = reference_scores(model, names, ex, pad_id).mean(axis=0)  # (M,)
    assert (mean > 0).all()
    np.testing.assert_allclose(as_matrix(raw), np.tile(mean, (3, 1)), rtol=1e-5)
    answer = dp_silo_importance(model, ex, pad_id, batch_size=N, steps=3, clip=1e12,
                                noise_multiplier=0.0, generator=torch.Generator())
    expected = smoothed_sensitivity(np.tile(mean, (3, 1)))
    np.testing.assert_allclose([answer.scores[n] for n in names], expected, rtol=1e-5)
    assert answer.num_examples == N and answer.max_tokens == MAX_LENGTH


def test_one_example_moves_the_step_sum_by_at_most_the_clip(setup):
    model, pad_id, ex = setup
    clip = 1e-6  # far below every example's score norm: each clipped vector has norm clip
    full = as_matrix(dp(model, ex, pad_id, clip=clip, noise=0.0, seed=0))
    for drop in (0, N - 1):
        rest = ex[:drop] + ex[drop + 1:]
        removed = as_matrix(dp(model, rest, pad_id, clip=clip, noise=0.0, seed=0))
        # q = 1 both times; the public normaliser q*n is N vs N - 1: compare the sums / N
        diff = np.linalg.norm(full - removed * (N - 1) / N, axis=1)  # (steps,)
        assert (diff <= clip / N * (1 + 1e-6)).all()
        assert (diff >= clip / N * 0.999).all()  # the dropped example did count, clipped


def test_noise_has_the_gaussian_mechanism_scale(setup):
    model, pad_id, ex = setup
    a = as_matrix(dp(model, ex, pad_id, clip=1.0, noise=1.0, seed=1, steps=4))
    b = as_matrix(dp(model, ex, pad_id, clip=1.0, noise=1.0, seed=2, steps=4))
    again = as_matrix(dp(model, ex, pad_id, clip=1.0, noise=1.0, seed=1, steps=4))
    np.testing.assert_array_equal(a, again)  # all randomness comes from the generator
    assert not np.allclose(a, b)
    expected = np.sqrt(2) * 1.0 * 1.0 / N  # sqrt(2) sigma clip / (q n), q = 1
    assert expected / 3 < float((a - b).std()) < 3 * expected


def test_poisson_sampling_empty_steps_and_the_positive_floor(setup):
    model, pad_id, ex = setup
    raw = as_matrix(dp(model, ex, pad_id, clip=1e12, noise=0.0, seed=3, batch_size=1,
                       steps=12))  # q = 1/12: some steps sample nobody
    assert np.isfinite(raw).all() and (raw >= 0).all()
    nonempty = {bool((row > 0).any()) for row in raw}
    assert nonempty == {False, True}  # both empty and non-empty samples occurred
    answer = dp_silo_importance(model, ex, pad_id, batch_size=4, steps=3, clip=1.0,
                                noise_multiplier=50.0,
                                generator=torch.Generator().manual_seed(0))
    assert min(answer.scores.values()) == DP_SCORE_FLOOR  # noise-dominated: some < 0
    assert all(v >= DP_SCORE_FLOOR for v in answer.scores.values())


def test_leaves_the_model_unchanged(setup):
    model, pad_id, ex = setup
    model.get_submodule("model.embed_tokens").weight.requires_grad_(False)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    dp_silo_importance(model, ex, pad_id, batch_size=4, steps=2, clip=1.0,
                       noise_multiplier=1.0, generator=torch.Generator().manual_seed(0))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"clip": 0.0}, "clip"), ({"noise_multiplier": -1.0}, "noise_multiplier"),
    ({"batch_size": 0}, "batch_size"), ({"steps": 0}, "steps"),
])
def test_rejects_bad_arguments(setup, kwargs, match):
    model, pad_id, ex = setup
    args = {"batch_size": 4, "steps": 2, "clip": 1.0, "noise_multiplier": 1.0} | kwargs
    with pytest.raises(ValueError, match=match):
        dp_silo_importance(model, ex, pad_id, generator=torch.Generator(), **args)
    with pytest.raises(ValueError, match="at least one"):
        dp_silo_importance(model, [], pad_id, generator=torch.Generator(),
                           **(args | {"clip": 1.0, "noise_multiplier": 1.0,
                                      "batch_size": 4, "steps": 2}))
