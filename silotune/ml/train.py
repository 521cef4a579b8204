"""Local LoRA training on one silo: plain, or DP-SGD with Opacus.

Recipe (see docs/privacy.md §1): fp32 base on the device before PEFT and Opacus; only
LoRA factors trainable; Poisson sampling; per-sequence loss; noise multiplier chosen by
the silo for its whole planned run; a liveness check that the factors moved. The
training loops themselves (plain and DP-SGD) are silotune.ml.dp_sgd's, shared with the
SLM.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from torch.utils.data import DataLoader, TensorDataset

from silotune.adapters.types import is_factor
from silotune.ml.dp_sgd import (
    DPConfig,
    LivenessError,
    OptimizerHook,
    run_dp_sgd,
    run_sgd,
    sample_rate_for,
)
from silotune.ml.lm import IGNORE_INDEX, EncodedExample, per_sequence_loss
from silotune.ml.precision import torch_dtype


@dataclass(frozen=True)
class LocalTrainConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...]
    local_steps: int
    batch_size: int
    physical_batch_size: int
    learning_rate: float
    init_seed: int  # public: fixes the LoRA init (and batch order of non-private runs)
    # Starting factors per module as PEFT holds them (A, B with the silo's scale already
    # divided out of B); None: PEFT's fresh init (A Kaiming-uniform, B = 0).
    init: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None
    frozen: tuple[str, ...] = ()  # factors that must not train, e.g. ("A",) for FFA-LoRA
    # Precision of the training copy of the base (silotune.ml.precision): "fp32" or "bf16".
    # The LoRA factors always train in fp32; the fp32 global base stays the master copy.
    base_precision: str = "fp32"


@dataclass(frozen=True)
class LocalTrainResult:
    adapter: dict[str, np.ndarray]  # PEFT state-dict keys -> fp32 arrays
    loss: float  # mean training loss over the local steps
    steps: int  # logical optimiser steps (= accountant steps under DP)
    sample_rate: float  # q as used by the sampler (DP), else batch_size / n
    liveness: float  # max |delta| over all LoRA factors


def tensor_dataset(examples: Sequence[EncodedExample], pad_id: int) -> TensorDataset:
    """Fixed-width tensors, so Opacus can build empty Poisson batches of the right shape."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
        mask[i, : len(e.input_ids)] = 1
    return TensorDataset(ids, mask, labels)


def attach_lora(base: torch.nn.Module, cfg: LocalTrainConfig) -> torch.nn.Module:
    """A private copy of `base` with a LoRA started from `cfg.init` (or fresh), with the
    factors in `cfg.frozen` excluded from training."""
    model = base_copy(base, cfg.base_precision)  # the shared base stays untouched
    # PEFT types lora_alpha as int but computes the scale alpha / r in float.
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,  # type: ignore[arg-type]
                      target_modules=list(cfg.targets), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    with torch.random.fork_rng():  # seed the init without touching the caller's RNG
        torch.manual_seed(cfg.init_seed)
        peft_model = get_peft_model(model, lora)
    if cfg.init is not None:
        _load_factors(peft_model, cfg.init)
    for name, param in peft_model.named_parameters():
        if is_factor(name, cfg.frozen):
            param.requires_grad_(False)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    stray = [n for n in trainable if "lora_" not in n]
    if stray or not trainable:
        raise RuntimeError(f"only LoRA factors may train; found {stray or 'none'}")
    peft_model.train()
    return peft_model


@torch.no_grad()
def base_copy(base: torch.nn.Module, precision: str) -> torch.nn.Module:
    """A private copy of `base` whose floating-point parameters are stored at `precision`,
    built parameter by parameter (never a full fp32 copy first: that would be the peak)."""
    dtype = torch_dtype(precision)
    memo: dict[int, object] = {
        id(p): torch.nn.Parameter(p.detach().to(dtype, copy=True), requires_grad=p.requires_grad)
        for p in base.parameters() if p.is_floating_point()}
    return copy.deepcopy(base, memo)


@torch.no_grad()
def _load_factors(model: torch.nn.Module, init: Mapping[str, tuple[np.ndarray, np.ndarray]]
                  ) -> None:
    for module, (a, b) in init.items():
        layer = model.get_submodule(f"base_model.model.{module}")
        for factor, value in (("A", a), ("B", b)):
            weight = getattr(layer, f"lora_{factor}")["default"].weight
            if tuple(weight.shape) != value.shape:
                raise ValueError(f"initial lora_{factor} of '{module}' has shape "
                                 f"{value.shape}, the adapter needs {tuple(weight.shape)}")
            weight.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def _lora_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().cpu().numpy().copy()
            for k, v in get_peft_model_state_dict(model).items()}


def _step(model: torch.nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
    ids, mask, labels = batch
    width = int(mask.sum(1).max())  # trim the shared padding
    out = model(input_ids=ids[:, :width], attention_mask=mask[:, :width])
    return per_sequence_loss(out.logits, labels[:, :width])


# Known, understood warnings (Opacus' own are silenced in silotune.ml.dp_sgd).
_BENIGN = ("is_gradient_checkpointing",)


def train_local(base: torch.nn.Module, examples: Sequence[EncodedExample], pad_id: int,
                cfg: LocalTrainConfig, dp: DPConfig | None,
                hook: OptimizerHook | None = None,
                units: torch.Tensor | None = None) -> LocalTrainResult:
    """Train a fresh LoRA on `examples` for `cfg.local_steps` logical steps.

    With `dp`, DP-SGD (Opacus): Poisson sampling at q = 1/len(loader), per-example
    clipping to `dp.max_grad_norm`, Gaussian noise `dp.noise_multiplier * clip`. The
    noise comes from a generator seeded by the OS (never by the public run seed), unless
    a simulation asks for reproducible noise (`dp.noise_seed`).
    `hook` (DP only) wraps the DP optimizer before the first step. `units` (DP only,
    `silotune.ml.dp_sgd.unit_rows`): privacy units of several rows; batches then count
    units and q is over units.
    """
    if not examples:
        raise ValueError("this silo has no training examples")
    if hook is not None and dp is None:
        raise ValueError("an optimizer hook needs DP-SGD (pass a DPConfig)")
    with warnings.catch_warnings():
        for text in _BENIGN:
            warnings.filterwarnings("ignore", message=f".*{text}")
        return _train_local(base, examples, pad_id, cfg, dp, hook, units)


def _train_local(base: torch.nn.Module, examples: Sequence[EncodedExample], pad_id: int,
                 cfg: LocalTrainConfig, dp: DPConfig | None,
                 hook: OptimizerHook | None, units: torch.Tensor | None,
                 ) -> LocalTrainResult:
    model = attach_lora(base, cfg)
    before = _lora_state(model)
    data = tensor_dataset(examples, pad_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    order = torch.Generator().manual_seed(cfg.init_seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=order)
    step = partial(_step, model)
    if dp is None:
        loss = run_sgd(optimizer, loader, cfg.local_steps, step)
        q = cfg.batch_size / len(data)
    else:
        loss = run_dp_sgd(model, optimizer, loader, cfg.local_steps, step, dp,
                          cfg.physical_batch_size, hook, units)
        q = sample_rate_for(len(data) if units is None else len(units), cfg.batch_size)
    after = _lora_state(model)
    moved = max(float(np.abs(after[k] - before[k]).max()) for k in after)
    changed = [k for k in after if is_factor(k, cfg.frozen)
               and not np.array_equal(after[k], before[k])]
    if changed:
        raise RuntimeError(f"frozen factors changed during training: {changed[:3]}")
    if moved == 0.0:
        raise LivenessError("LoRA factors did not change during training; refusing to "
                            "report this round (check that the optimizer sees the LoRA "
                            "parameters and the learning rate is > 0)")
    return LocalTrainResult(adapter=after, loss=loss, steps=cfg.local_steps, sample_rate=q,
                            liveness=moved)

