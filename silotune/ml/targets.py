"""Which modules get a LoRA (``lora-targets``): ``auto`` or the names the model has.

``auto`` (the default) takes PEFT's default LoRA targets for the model's architecture
(`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, keyed by ``config.model_type``:
q_proj and v_proj for Llama, c_attn for GPT-2, query_key_value for GPT-NeoX, Falcon and
BLOOM, ...) that the model has; a model type PEFT does not know gets the first group of
common attention projections the model has. The coordinator resolves it where it loads
the model, so every silo is sent explicit names (docs/architecture.md, one round step 1).
An explicit name the model lacks is an error that lists the linear modules it has.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.pytorch_utils import Conv1D

AUTO = "auto"
# Attention projections of architectures PEFT's table may not list, in order of preference.
_COMMON_GROUPS = (("q_proj", "v_proj"), ("c_attn",), ("query_key_value",),
                  ("query", "value"), ("Wqkv",), ("qkv_proj",), ("q", "v"))


class TargetError(ValueError):
    """``lora-targets`` names modules the model does not have."""


def linear_names(model: torch.nn.Module) -> list[str]:
    """The last name components of the model's Linear and Conv1D (GPT-2) modules."""
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                   if name and isinstance(module, torch.nn.Linear | Conv1D)})


def resolve_targets(model: torch.nn.Module, requested: tuple[str, ...]) -> tuple[str, ...]:
    """The module names that get a LoRA: `requested` checked against `model`, or for
    ``("auto",)`` the model's attention projections.

    Raises
    ------
    TargetError
        A requested name is not a Linear/Conv1D module of the model, or ``auto`` finds no
        attention projection (the message lists the names there are).
    """
    available = linear_names(model)
    if AUTO in requested:
        if requested != (AUTO,):
            raise TargetError(f"--lora-targets: 'auto' cannot be combined with module "
                              f"names, got {','.join(requested)}")
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS,
        )

        model_type = getattr(getattr(model, "config", None), "model_type", "")
        known = tuple(t for t in PEFT_DEFAULTS.get(model_type, ()) if t in available)
        if known:
            return known
        for group in _COMMON_GROUPS:
            if all(t in available for t in group):
                return group
        raise TargetError(f"--lora-targets auto: no known attention projection in this "
                          f"{model_type or 'model'}; choose --lora-targets from its linear "
                          f"modules: {', '.join(available)}")
    missing = [t for t in requested if t not in available]
    if missing:
        raise TargetError(f"--lora-targets: the model has no Linear/Conv1D module named "
                          f"{', '.join(missing)}; its linear modules: {', '.join(available)}")
    return requested


def resolve_targets_of(folder: Path, requested: tuple[str, ...]) -> tuple[str, ...]:
    """`resolve_targets` for the model in `folder`, built without its weights (on the
    meta device: seconds and no memory), to check the targets before a run starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return resolve_targets(model, requested)
