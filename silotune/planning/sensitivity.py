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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from silotune.ml.lm import EncodedExample, per_sequence_loss
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


def raw_sensitivities(model: torch.nn.Module, examples: Sequence[EncodedExample],
                      pad_id: int, batch_size: int, steps: int, seed: int
                      ) -> dict[str, np.ndarray]:
    """``sum |W * dL/dW|`` of every candidate matrix at each of `steps` calibration
    mini-batches of `batch_size` examples (drawn with `seed`): module -> (steps,).

    `model` is not modified (its weights' ``requires_grad`` flags are restored)."""
    if not examples:
        raise ValueError("importance scoring needs at least one calibration example")
    names = sorted(module_shapes(model, CANDIDATES))
    weights: dict[str, torch.Tensor] = {n: _weight(model, n) for n in names}
    flags = {id(p): p.requires_grad for p in model.parameters()}
    data = tensor_dataset(examples, pad_id)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    scores = {n: np.zeros(steps) for n in names}
    step = 0

    def record(name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            assert param.grad is not None  # the hook runs right after accumulation
            scores[name][step] = float((param.detach() * param.grad).abs().sum())
            param.grad = None  # one weight gradient alive at a time

        return hook

    handles = []
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name, w in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(record(name)))
        model.eval()  # no dropout: the score of the weights, not of a random mask
        for step in range(steps):
            rows = order[(torch.arange(batch_size) + step * batch_size) % len(data)]
            ids, mask, labels = (t[rows] for t in data.tensors)
            width = int(mask.sum(1).max())
            out = model(input_ids=ids[:, :width], attention_mask=mask[:, :width])
            per_sequence_loss(out.logits, labels[:, :width]).backward()
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)
    return scores


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
    names = sorted(raw)
    smoothed = smoothed_sensitivity(np.stack([raw[n] for n in names], axis=1))  # (M,)
    return SiloImportance(scores=dict(zip(names, map(float, smoothed), strict=True)),
                          num_examples=len(examples),
                          max_tokens=max(len(e.input_ids) for e in examples))
