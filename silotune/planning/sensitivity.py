"""On the silo: per-matrix sensitivity of the training loss on a small calibration batch.

FedPipe (Fang et al., arXiv 2404.06448) scores the weight matrices by their contribution
to training before choosing which to adapt. Here, as AdaLoRA (Zhang et al., ICLR 2023,
eq. 8): the sensitivity of a weight is ``I(w) = |w * dL/dw|``; a matrix's raw score at a
calibration step is the sum over its entries, and the smoothing over steps
(`silotune.planning.importance.smoothed_sensitivity`) is applied to those per-matrix
sums. Only the per-matrix scores leave the silo, never data or gradients.

Gradients are taken with respect to the frozen base weights one matrix at a time (each
is summed into its score as soon as it is accumulated, then dropped), so the pass needs
no more memory than one weight gradient on top of a forward/backward.

A private silo answers with `dp_silo_importance` instead: the same FedPipe/AdaLoRA score
taken per example, clipped, summed over Poisson samples and noised (the Gaussian
mechanism of DP-SGD, Abadi et al. 2016), then smoothed the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from silotune.ml.lm import MAX_LENGTH, EncodedExample, per_sequence_loss
from silotune.ml.merge import module_shapes
from silotune.ml.train import tensor_dataset
from silotune.planning.importance import smoothed_sensitivity
from silotune.planning.resources import CANDIDATES, ModelSpec


def model_spec(model: torch.nn.Module) -> ModelSpec:
    """The memory/time model's view of `model` (tied weights counted once)."""
    shapes = module_shapes(model, CANDIDATES)
    matrices: dict[str, list[tuple[int, int]]] = {}
    for name in sorted(shapes, key=_layer_order):
        matrices.setdefault(name.rpartition(".")[2], []).append(shapes[name])
    config: Any = model.config  # transformers' PretrainedConfig
    return ModelSpec(num_params=sum(p.numel() for p in model.parameters()),
                     vocab_size=int(config.vocab_size), hidden_size=int(config.hidden_size),
                     num_layers=int(config.num_hidden_layers),
                     matrices={t: tuple(v) for t, v in matrices.items()})


def _layer_order(name: str) -> tuple[int, str]:
    digits = [int(p) for p in name.split(".") if p.isdigit()]
    return (digits[0] if digits else -1, name)


def _weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    weight = model.get_submodule(name).weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"module '{name}' has no weight tensor")
    return weight


_Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], np.ndarray]


@contextmanager
def _scorer(model: torch.nn.Module, names: Sequence[str]) -> Iterator[_Scorer]:
    """Within the block, ``score(ids, mask, labels)`` runs one forward/backward of the
    `per_sequence_loss` of those (right-padded) rows and returns ``sum |W * dL/dW|`` of
    each matrix of `names`, in that order, as (len(names),) float64.

    On exit `model` is as before: ``requires_grad`` flags and train/eval mode restored,
    no ``.grad`` left."""
    weights = [_weight(model, n) for n in names]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    current = np.zeros(len(names))

    def record(index: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            assert param.grad is not None  # the hook runs right after accumulation
            current[index] = float((param.detach() * param.grad).abs().sum())
            param.grad = None  # one weight gradient alive at a time

        return hook

    def score(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
        current[:] = 0.0
        width = int(mask.sum(1).max())
        out = model(input_ids=ids[:, :width], attention_mask=mask[:, :width])
        per_sequence_loss(out.logits, labels[:, :width]).backward()
        return current.copy()

    handles = []
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for index, w in enumerate(weights):
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(record(index)))
        model.eval()  # no dropout: the score of the weights, not of a random mask
        yield score
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)


def raw_sensitivities(model: torch.nn.Module, examples: Sequence[EncodedExample],
                      pad_id: int, batch_size: int, steps: int, seed: int
                      ) -> dict[str, np.ndarray]:
    """``sum |W * dL/dW|`` of every candidate matrix at each of `steps` calibration
    mini-batches of `batch_size` examples (drawn with `seed`): module -> (steps,).

    `model` is not modified (its weights' ``requires_grad`` flags are restored)."""
    if not examples:
        raise ValueError("importance scoring needs at least one calibration example")
    names = sorted(module_shapes(model, CANDIDATES))
    data = tensor_dataset(examples, pad_id)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    raw = np.zeros((steps, len(names)))
    with _scorer(model, names) as score:
        for step in range(steps):
            rows = order[(torch.arange(batch_size) + step * batch_size) % len(data)]
            raw[step] = score(*(t[rows] for t in data.tensors))
    return {n: raw[:, j].copy() for j, n in enumerate(names)}


@dataclass(frozen=True)
class SiloImportance:
    """One silo's importance answer: smoothed sensitivity per candidate matrix."""

    scores: dict[str, float]
    num_examples: int
    max_tokens: int  # the silo's longest encoded example (memory model)


def silo_importance(model: torch.nn.Module, examples: Sequence[EncodedExample], pad_id: int,
                    batch_size: int, steps: int, seed: int) -> SiloImportance:
    """What a silo answers to an importance query (and what `silotune plan` computes for
    each simulated silo): `raw_sensitivities` smoothed over the calibration steps."""
    raw = raw_sensitivities(model, examples, pad_id, batch_size, steps, seed)
    return SiloImportance(scores=_smoothed(raw), num_examples=len(examples),
                          max_tokens=max(len(e.input_ids) for e in examples))


def _smoothed(raw: dict[str, np.ndarray]) -> dict[str, float]:
    """module -> (steps,) per-step scores, smoothed over the steps (`smoothed_sensitivity`)."""
    names = sorted(raw)
    smoothed = smoothed_sensitivity(np.stack([raw[n] for n in names], axis=1))  # (M,)
    return dict(zip(names, map(float, smoothed), strict=True))


DP_SCORE_FLOOR = 1e-12  # the least score of a DP answer (the noisy statistic can be < 0)


def dp_raw_sensitivities(model: torch.nn.Module, examples: Sequence[EncodedExample],
                         pad_id: int, *, batch_size: int, steps: int, clip: float,
                         noise_multiplier: float, generator: torch.Generator
                         ) -> dict[str, np.ndarray]:
    """The DP counterpart of `raw_sensitivities`: module -> (steps,) noisy mean scores.

    Privacy unit: one example. Its score vector ``s_i[m] = sum |W_m * dL_i/dW_m|`` (L_i its
    own `per_sequence_loss`) over the M candidate matrices is clipped to L2 norm `clip`.
    Each step draws a Poisson sample at rate ``q = min(1, batch_size / n)`` from
    `generator`, sums the sampled clipped vectors, adds ``N(0, (noise_multiplier *
    clip)^2)`` to each coordinate (from `generator` too) and divides by ``q * n``. Under
    add/remove-one the sum has L2 sensitivity `clip`, so a step is the Poisson-subsampled
    Gaussian mechanism of DP-SGD (Abadi et al., CCS 2016) and the release costs exactly
    ``AccountingStep(noise_multiplier, q, steps)``, which the caller must charge (the
    division by ``q * n`` is post-processing by a public constant: the declared `n`, or
    `batch_size` when below it). `noise_multiplier` = 0 gives no privacy (tests only).
    `generator` must be seeded secretly by the caller; `model` is left unmodified.
    """
    _check_dp(examples, batch_size, steps, clip, noise_multiplier)
    names = sorted(module_shapes(model, CANDIDATES))
    data = tensor_dataset(examples, pad_id)
    n = len(data)
    q = min(1.0, batch_size / n)
    clipped: dict[int, np.ndarray] = {}  # eval mode: an example's score does not change
    raw = np.zeros((steps, len(names)))
    with _scorer(model, names) as score:
        for step in range(steps):
            sample = torch.nonzero(torch.rand(n, generator=generator) < q).flatten()
            total = np.zeros(len(names))
            for i in map(int, sample):
                if i not in clipped:
                    clipped[i] = _clipped(score(*(t[i:i + 1] for t in data.tensors)), clip)
                total += clipped[i]
            noise = torch.randn(len(names), generator=generator, dtype=torch.float64)
            raw[step] = (total + noise_multiplier * clip * noise.numpy()) / (q * n)
    return {name: raw[:, j].copy() for j, name in enumerate(names)}


def dp_silo_importance(model: torch.nn.Module, examples: Sequence[EncodedExample],
                       pad_id: int, *, batch_size: int, steps: int, clip: float,
                       noise_multiplier: float, generator: torch.Generator
                       ) -> SiloImportance:
    """A private silo's answer to an importance query: `dp_raw_sensitivities` smoothed
    over the steps like `silo_importance`, each score floored at `DP_SCORE_FLOOR` (the
    noisy scores can be negative; the answer stays positive like an exact one). Only
    public sizes go with it: the example count and the truncation length `MAX_LENGTH`,
    not the longest private example. The caller charges
    ``AccountingStep(noise_multiplier, min(1, batch_size / len(examples)), steps)``."""
    raw = dp_raw_sensitivities(model, examples, pad_id, batch_size=batch_size, steps=steps,
                               clip=clip, noise_multiplier=noise_multiplier,
                               generator=generator)
    scores = {n: max(DP_SCORE_FLOOR, v) for n, v in _smoothed(raw).items()}
    return SiloImportance(scores=scores, num_examples=len(examples), max_tokens=MAX_LENGTH)


def _clipped(vector: np.ndarray, clip: float) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector * (clip / norm) if norm > clip else vector


def _check_dp(examples: Sequence[EncodedExample], batch_size: int, steps: int, clip: float,
              noise_multiplier: float) -> None:
    if not examples:
        raise ValueError("importance scoring needs at least one calibration example")
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size and steps must be >= 1, got {batch_size}, {steps}")
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be finite and > 0, got {clip}")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
