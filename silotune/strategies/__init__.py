"""Aggregation rules for heterogeneous LoRA adapters, selected by name from a registry.

Each rule's module (one per paper) registers it; importing this package registers them
all. ``create("flora")`` returns a fresh rule; an unknown name raises and lists the
valid names.
"""

from __future__ import annotations

from silotune.strategies import fedit, fedsa, ffa, flexlora, flora, hetlora, zeropad
from silotune.strategies.registry import UnknownStrategyError, available, create

RULE_MODULES = (flora, fedit, zeropad, hetlora, flexlora, ffa, fedsa)

__all__ = ["RULE_MODULES", "UnknownStrategyError", "available", "create"]
