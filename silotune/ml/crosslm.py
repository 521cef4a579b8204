"""CrossLM-style mutual enhancement: the pure math of the feedback loop.

CrossLM (Deng et al., "Mutual Enhancement of Large and Small Language Models with
Cross-Silo Knowledge Transfer", arXiv 2312.05842) lets silos that hold private data and
small models (SLMs) steer a central LLM's synthetic task data, and then trains both
sides on it. The loop as built here (docs/algorithms.md §7, a project reconstruction):

1. each silo trains SLM_k on its private data with DP-SGD;
2. the LLM G samples texts x_j ~ G(. | prompt(y_j)) for every label y;
3. silo k returns only f_k(x_j, y_j) = p_SLM_k(y_j | x_j);
4. the coordinator combines f_j = sum_k w_k f_k(x_j, y_j) with w_k = n_k / sum_i n_i,
   updates G with LoRA by the feedback-weighted likelihood
   L_G = sum_j w^_j NLL_j / sum_j w^_j (w^_j = f_j normalised to mean 1), and keeps the
   examples with f_j >= tau;
5. silos train on the kept synthetic set plus their private data.

DP argument: if every SLM_k is DP-SGD trained, f_k is post-processing and costs no extra
epsilon; an SLM that was not trained with DP is refused unless the run is non-private.
Nothing here imports Flower.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

WEIGHTINGS = ("feedback", "uniform")


class FeedbackRefusedError(ValueError):
    """Feedback from an SLM that was not trained with DP, in a private run."""


def check_feedback_allowed(slm_dp_trained: bool, private_run: bool) -> None:
    """Refuse feedback from a non-DP SLM unless the run is explicitly non-private.

    Without DP, per-example scores of a model trained on private records are a
    membership side channel (docs/algorithms.md §7); with DP they are post-processing.
    """
    if private_run and not slm_dp_trained:
        raise FeedbackRefusedError(
            "this SLM was not trained with DP-SGD, so its scores could leak membership of "
            "private records; retrain it with DP (a finite --epsilon) or mark the whole run "
            "non-private (--epsilon inf)")


def silo_weights(num_examples: Mapping[str, int]) -> dict[str, float]:
    """w_k = n_k / sum_i n_i (silos with more private data count more)."""
    total = sum(num_examples.values())
    if total <= 0 or any(n < 0 for n in num_examples.values()):
        raise ValueError(f"example counts must be >= 0 with a positive sum, got {num_examples}")
    return {silo: n / total for silo, n in num_examples.items()}


def aggregate_feedback(scores: Mapping[str, Sequence[float]],
                       num_examples: Mapping[str, int]) -> np.ndarray:
    """f_j = sum_k w_k f_k(j) over the silos that replied; (N,) in [0, 1].

    Parameters
    ----------
    scores : mapping silo -> N scores p_SLM_k(y_j | x_j), all of the same length.
    num_examples : mapping silo -> n_k, the silo's private example count.
    """
    if not scores:
        raise ValueError("no silo returned feedback; cannot aggregate")
    lengths = {len(s) for s in scores.values()}
    if len(lengths) != 1:
        raise ValueError(f"silos returned different numbers of scores: {sorted(lengths)}")
    weights = silo_weights({s: num_examples[s] for s in scores})
    stacked = np.stack([np.asarray(scores[s], dtype=np.float64) for s in sorted(scores)])
    w = np.array([weights[s] for s in sorted(scores)])  # (K,)
    return np.asarray(w @ stacked)  # (N,)


def keep_mask(feedback: np.ndarray, threshold: float) -> np.ndarray:
    """Examples kept for SLM training: f_j >= tau."""
    return np.asarray(feedback >= threshold)


def example_weights(feedback: np.ndarray, weighting: str) -> np.ndarray:
    """LLM update weights w^_j, mean 1 over the set.

    ``feedback``: f_j normalised to mean 1 (all zero feedback gives all zero weights, so
    the LLM is not updated); ``uniform``: every example 1 (the ablation without feedback).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
    if weighting == "uniform" or len(feedback) == 0:
        return np.ones(len(feedback))
    mean = float(np.mean(feedback))
    return np.zeros(len(feedback)) if mean <= 0 else feedback / mean


def weighted_loss(per_sequence: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Feedback-weighted likelihood of a batch: mean_j w^_j NLL_j (weights mean 1 over the
    whole set, so batches are on one scale and uniform weights give the plain mean)."""
    if per_sequence.shape != weights.shape:
        raise ValueError(f"loss shape {tuple(per_sequence.shape)} != weight shape "
                         f"{tuple(weights.shape)}")
    return (per_sequence * weights).mean()


@dataclass(frozen=True)
class FeedbackSummary:
    """What the coordinator reports about one round's synthetic set."""

    size: int
    kept: int
    mean_score: float
    mean_kept_score: float

    def to_dict(self) -> dict[str, float | int]:
        return {"synthetic_size": self.size, "synthetic_kept": self.kept,
                "mean_score": self.mean_score, "mean_kept_score": self.mean_kept_score}


def summarise(feedback: np.ndarray, kept: np.ndarray) -> FeedbackSummary:
    """Size, kept count, mean score and mean kept score of a scored synthetic set."""
    def mean(x: np.ndarray) -> float:
        return float(np.mean(x)) if len(x) else 0.0
    return FeedbackSummary(size=len(feedback), kept=int(kept.sum()), mean_score=mean(feedback),
                           mean_kept_score=mean(feedback[kept]))
