"""The one DP-SGD training loop of the package, on Opacus; LoRA and SLM training share it.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016,
arXiv:1607.00133): every logical step draws a Poisson-sampled batch at rate q, clips each
example's gradient to L2 norm C, sums, adds Gaussian noise N(0, sigma^2 C^2) and takes an
optimiser step. Opacus (Yousefpour et al., "Opacus: User-Friendly Differential Privacy
Library in PyTorch", arXiv:2109.12298) supplies the per-example gradients, the clipping
and noise (`PrivacyEngine.make_private`), the Poisson sampler and the split of a logical
batch into physical micro-batches (`BatchMemoryManager`). The accounting that turns
(sigma, q, steps) into epsilon lives with the silo (silotune.privacy), not here.

**Privacy units of several rows** (e.g. a patient's notes; docs/privacy.md §8). With
`units` (row indices of each unit), the Poisson draws are over units, not rows, and each
sampled unit's gradient is the mean of its rows' per-example gradients (Opacus computes
one per row), formed before Opacus clips it: one unit then moves a step's gradient sum by
at most C however many rows it has, and q = batch / number of units is the sampling rate
the accountant must use.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.data import DataLoader, TensorDataset

Batch = Sequence[torch.Tensor]
LossFn = Callable[[Batch], torch.Tensor]  # a batch -> the mean loss over its examples

# Understood Opacus/torch warnings: secure_mode=False is recorded in every ledger entry;
# the backward-hook note is expected with a frozen base (its inputs need no grad).
_BENIGN = ("Secure RNG turned off", "Full backward hook is firing")


class LivenessError(RuntimeError):
    """Training finished but no trainable weight changed (opacus#820-class bug)."""


@dataclass(frozen=True)
class DPConfig:
    noise_multiplier: float
    max_grad_norm: float
    # None (always, outside simulations): the noise AND the Poisson batch draws come from
    # OS randomness that nobody outside the silo knows. An int (a simulation's
    # reproducible comparisons only) seeds both.
    noise_seed: int | None = None


class OptimizerHook(Protocol):
    """Wraps the DP optimizer before training, e.g. to insert audit canaries
    (silotune.privacy.canary_audit); called once, with the sampler's q."""

    def attach(self, optimizer: DPOptimizer, sample_rate: float) -> None: ...


def unit_rows(units: Sequence[object]) -> torch.Tensor:
    """The rows of each privacy unit, from the unit of every row (e.g. a patient id):
    a (number of units, most rows of a unit) matrix of row indices, padded with -1, in
    order of first appearance."""
    rows: dict[object, list[int]] = {}
    for index, unit in enumerate(units):
        rows.setdefault(unit, []).append(index)
    width = max((len(r) for r in rows.values()), default=0)
    out = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows.values()):
        out[i, :len(r)] = torch.tensor(r)
    return out


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Opacus' q = 1 / len(DataLoader(ds, batch_size)), known before training."""
    return 1.0 / max(1, -(-num_examples // batch_size))


def run_sgd(optimizer: torch.optim.Optimizer, loader: DataLoader, steps: int,
            loss_fn: LossFn) -> float:
    """`steps` plain optimiser steps on `loader`'s batches (cycled); the mean loss."""
    losses: list[float] = []
    for batch in _cycle(loader, steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return _mean(losses)


def run_dp_sgd(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader,
               steps: int, loss_fn: LossFn, dp: DPConfig, physical_batch_size: int,
               hook: OptimizerHook | None = None, units: torch.Tensor | None = None,
               ) -> float:
    """Train `model` in place with DP-SGD for exactly `steps` logical steps.

    Parameters
    ----------
    model, optimizer
        The model (trainable parameters only in `optimizer`) and its plain optimiser.
    loader
        A DataLoader over a fixed-width dataset; only its dataset and batch size are used:
        DP-SGD samples Poisson batches at q = 1 / len(loader) (`sample_rate_for`) from a
        generator of its own (see `dp`), never from the loader's (publicly seeded) one.
    steps
        Logical steps (= accountant steps); an empty Poisson draw is a noise-only step.
    loss_fn
        A batch -> its mean loss (Opacus rescales per-example gradients accordingly).
    dp
        sigma, clip norm C, and the seed: None draws the noise and the batches from the
        OS (the coordinator cannot know them, so amplification by subsampling holds
        against it); an int makes both reproducible (simulations).
    physical_batch_size
        The most examples per forward/backward pass (`BatchMemoryManager`).
    hook
        Wraps the DP optimizer once, before the first step.
    units
        The privacy unit's rows (`unit_rows`), when a unit is not one row: batches are
        then drawn over units (the loader's batch size counts units) and each unit's
        gradient is the mean of its rows' before clipping.

    Returns
    -------
    float
        The mean loss over the physical batches that held examples (0.0 if none).
    """
    drawn = loader.dataset if units is None else TensorDataset(units)
    q = sample_rate_for(len(cast(Sized, drawn)), _batch_size(loader))
    noise, sampling = _generators(dp.noise_seed)
    secret = DataLoader(drawn, batch_size=loader.batch_size, generator=sampling)
    if units is not None:
        loss_fn = _per_unit(loss_fn, cast(TensorDataset, loader.dataset))
    with warnings.catch_warnings():
        for text in _BENIGN:
            warnings.filterwarnings("ignore", message=f".*{text}")
        engine = PrivacyEngine(accountant="prv", secure_mode=False)
        hooks, dp_optimizer, dp_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=secret,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True, grad_sample_mode="hooks", wrap_model=False,
            noise_generator=noise)
        if abs(dp_loader.sample_rate - q) > 1e-12:
            raise RuntimeError(f"sampler q={dp_loader.sample_rate} differs from planned q={q}")
        if hook is not None:
            hook.attach(dp_optimizer, q)
        try:
            losses = _logical_steps(engine, dp_optimizer, dp_loader, steps, loss_fn,
                                    physical_batch_size)
        finally:
            hooks.cleanup()
    done = _steps_done(engine)
    if done != steps:
        raise RuntimeError(f"accountant counted {done} steps, planned {steps}")
    return _mean(losses)


def _generators(seed: int | None) -> tuple[torch.Generator, torch.Generator]:
    """The noise and the batch-sampling generators: OS-seeded unless a simulation fixes
    `seed` (two independent streams derived from it); never the public run seed."""
    if seed is None:
        return (torch.Generator().manual_seed(secrets.randbits(63)),
                torch.Generator().manual_seed(secrets.randbits(63)))
    noise, sampling = np.random.SeedSequence(seed).generate_state(2, np.uint64) >> np.uint64(1)
    return (torch.Generator().manual_seed(int(noise)),
            torch.Generator().manual_seed(int(sampling)))


def _logical_steps(engine: PrivacyEngine, optimizer: DPOptimizer, loader: DataLoader,
                   steps: int, loss_fn: LossFn, physical_batch_size: int) -> list[float]:
    """Physical micro-batches until the accountant has counted `steps` logical steps."""
    losses: list[float] = []
    with BatchMemoryManager(data_loader=loader, optimizer=optimizer,
                            max_physical_batch_size=physical_batch_size) as batches:
        while _steps_done(engine) < steps:
            for batch in batches:
                optimizer.zero_grad(set_to_none=True)
                if batch[0].shape[0] == 0:  # an empty Poisson draw: noise-only step
                    for p in optimizer.params:  # no examples: an empty per-sample gradient
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype,
                                                    device=p.device)
                    optimizer.step()
                else:
                    loss = loss_fn(batch)
                    loss.backward()
                    if isinstance(loss_fn, _per_unit):
                        loss_fn.average_rows(optimizer.params)
                    optimizer.step()
                    losses.append(loss.item())
                if _steps_done(engine) >= steps:
                    break
    return losses


class _per_unit:  # noqa: N801 (used like the function it wraps)
    """The loss of a batch of units (rows of `rows` gathered by index), remembering
    which unit each row belongs to so that per-row gradients can be averaged per unit."""

    def __init__(self, loss_fn: LossFn, rows: TensorDataset) -> None:
        self.loss_fn, self.rows = loss_fn, rows
        self.unit_of_row = torch.empty(0, dtype=torch.long)
        self.rows_per_unit = torch.empty(0)

    def __call__(self, batch: Batch) -> torch.Tensor:
        index = batch[0]  # (units in the batch, most rows of a unit), -1 padded
        present = index >= 0
        self.rows_per_unit = present.sum(1)
        self.unit_of_row = torch.arange(len(index)).repeat_interleave(self.rows_per_unit)
        return self.loss_fn([t[index[present]] for t in self.rows.tensors])

    def average_rows(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Replace each parameter's per-row gradients by per-unit means (before Opacus
        clips them: the clip then bounds a whole unit)."""
        for p in params:
            rows = p.grad_sample  # type: ignore[attr-defined]
            if not isinstance(rows, torch.Tensor):  # a module run twice in one pass
                raise RuntimeError("per-unit gradients need one per-row gradient tensor per "
                                   f"parameter, got {type(rows).__name__}")
            units = torch.zeros((len(self.rows_per_unit), *rows.shape[1:]),
                                dtype=rows.dtype, device=rows.device)
            units.index_add_(0, self.unit_of_row.to(rows.device), rows)
            shape = (-1, *[1] * (rows.dim() - 1))
            p.grad_sample = units / self.rows_per_unit.to(rows.device).view(shape)  # type: ignore[attr-defined]


def _steps_done(engine: PrivacyEngine) -> int:
    return sum(n for _, _, n in engine.accountant.history)


def _batch_size(loader: DataLoader) -> int:
    if loader.batch_size is None:
        raise ValueError("DP-SGD needs a loader with a batch_size (Poisson sampling sets q "
                         "from it)")
    return loader.batch_size


def _cycle(loader: DataLoader, steps: int) -> Iterator[Batch]:
    done = 0
    while done < steps:
        for batch in loader:
            yield batch
            done += 1
            if done == steps:
                return


def _mean(losses: Sequence[float]) -> float:
    return float(np.mean(losses)) if losses else 0.0
