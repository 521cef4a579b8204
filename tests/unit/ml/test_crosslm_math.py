"""CrossLM feedback math (silotune/ml/crosslm.py) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silotune.ml.crosslm import (
    FeedbackRefusedError,
    aggregate_feedback,
    check_feedback_allowed,
    example_weights,
    keep_mask,
    silo_weights,
    summarise,
    weighted_loss,
)


def test_feedback_is_the_example_count_weighted_mean():
    scores = {"a": [1.0, 0.0, 0.5], "b": [0.0, 1.0, 0.5]}
    assert silo_weights({"a": 30, "b": 10}) == {"a": 0.75, "b": 0.25}
    f = aggregate_feedback(scores, {"a": 30, "b": 10, "absent": 1000})
    np.testing.assert_allclose(f, [0.75, 0.25, 0.5])


def test_feedback_rejects_ragged_or_missing_scores():
    with pytest.raises(ValueError, match="different numbers"):
        aggregate_feedback({"a": [0.1], "b": [0.1, 0.2]}, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="no silo"):
        aggregate_feedback({}, {})


def test_keep_and_weights():
    f = np.array([0.9, 0.1, 0.5, 0.3])
    assert keep_mask(f, 0.3).tolist() == [True, False, True, True]
    np.testing.assert_allclose(example_weights(f, "feedback"), f / 0.45)
    np.testing.assert_allclose(example_weights(f, "uniform"), np.ones(4))
    np.testing.assert_allclose(example_weights(np.zeros(3), "feedback"), np.zeros(3))
    with pytest.raises(ValueError, match="uniform"):
        example_weights(f, "bogus")
    s = summarise(f, keep_mask(f, 0.3))
    assert (s.size, s.kept) == (4, 3)
    assert s.mean_score == pytest.approx(0.45) and s.mean_kept_score == pytest.approx(17 / 30)


def test_weighted_loss_is_the_weighted_mean():
    loss = weighted_loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 1.5, 1.5]))
    assert loss.item() == pytest.approx((0 + 3 + 6) / 3)
    with pytest.raises(ValueError, match="shape"):
        weighted_loss(torch.ones(3), torch.ones(2))


def test_non_dp_slm_feedback_is_refused_unless_the_run_is_non_private():
    with pytest.raises(FeedbackRefusedError, match="non-private"):
        check_feedback_allowed(slm_dp_trained=False, private_run=True)
    check_feedback_allowed(slm_dp_trained=False, private_run=False)
    check_feedback_allowed(slm_dp_trained=True, private_run=True)
