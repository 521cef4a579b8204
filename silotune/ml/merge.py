"""Merging a round's low-rank global update into a base model, identically everywhere.

The coordinator and every silo call `apply_update` with the same fp32 factors in the
same round order, so all copies of the global base stay bit-identical (FLoRA's merged
base, docs/algorithms.md §2.2: "apply rounds in order, in fp32").
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

from silotune.adapters.types import AdapterError, LowRankUpdate


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
        if factors.w is not None:  # B diag(w)
            b = b * torch.from_numpy(np.ascontiguousarray(factors.w, dtype=np.float32))
        delta = (b @ a) * update.scale  # (d_out, d_in)
        if isinstance(module, Conv1D):
            delta = delta.T
        if delta.shape != weight.shape:
            raise AdapterError(f"update for '{name}' has shape {tuple(delta.shape)}, "
                               f"the weight is {tuple(weight.shape)}")
        weight.add_(delta.to(weight.dtype))


def module_shapes(model: torch.nn.Module, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every module whose last name component is one of `targets`."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] not in targets:
            continue
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
        elif isinstance(module, Conv1D):  # GPT-2 stores (d_in, d_out)
            shapes[name] = (module.weight.shape[1], module.weight.shape[0])
    if not shapes:
        raise ValueError(f"the model has no Linear/Conv1D modules named {list(targets)}; "
                         "choose --lora-targets from the model's module names")
    return shapes
