"""Merging a round's low-rank global update into a base model, identically everywhere.

The coordinator and every silo call `apply_update` with the same fp32 factors in the
same round order, so all copies of the global base stay bit-identical (FLoRA's merged
base, notes/algorithms.md §2.2: "apply rounds in order, in fp32").
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

from silotune.strategies.base import AdapterError, LoraFactors, LowRankUpdate


@torch.no_grad()
def apply_update(model: torch.nn.Module, update: LowRankUpdate) -> None:
    """W += scale * B @ A for every module of `update` (in place, fp32)."""
    for name, factors in update.modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as err:
            raise AdapterError(f"update names module '{name}', which the model lacks") from err
        weight = module.weight
        if not isinstance(weight, torch.Tensor):
            raise AdapterError(f"module '{name}' has no weight tensor to merge into")
        # Linear: (d_out, d_in); GPT-2 Conv1D: (d_in, d_out)
        a = torch.from_numpy(np.ascontiguousarray(factors.A, dtype=np.float32))  # (R, d_in)
        b = torch.from_numpy(np.ascontiguousarray(factors.B, dtype=np.float32))  # (d_out, R)
        delta = (b @ a) * update.scale  # (d_out, d_in)
        if isinstance(module, Conv1D):
            delta = delta.T
        if delta.shape != weight.shape:
            raise AdapterError(f"update for '{name}' has shape {tuple(delta.shape)}, "
                               f"the weight is {tuple(weight.shape)}")
        weight.add_(delta.to(weight.dtype))


def update_to_arrays(update: LowRankUpdate, prefix: str) -> dict[str, np.ndarray]:
    """Name-keyed fp32 arrays ``<prefix><module>.lora_{A,B}`` for the wire."""
    out: dict[str, np.ndarray] = {}
    for name, f in update.modules.items():
        out[f"{prefix}{name}.lora_A"] = np.asarray(f.A, dtype=np.float32)
        out[f"{prefix}{name}.lora_B"] = np.asarray(f.B, dtype=np.float32)
    return out


def update_from_arrays(arrays: Mapping[str, np.ndarray], prefix: str,
                       scale: float) -> LowRankUpdate:
    """Inverse of `update_to_arrays` for the keys that start with `prefix`."""
    pieces: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        if not key.startswith(prefix):
            continue
        module, _, factor = key[len(prefix):].rpartition(".lora_")
        pieces.setdefault(module, {})[factor] = value
    modules = {m: LoraFactors(A=p["A"], B=p["B"]) for m, p in sorted(pieces.items())}
    return LowRankUpdate(modules=modules, scale=scale)
