"""Aggregation rules for heterogeneous LoRA adapters, selected by name from a registry.

``create("flora")`` returns a fresh rule; an unknown name raises and lists the valid names.
"""

from __future__ import annotations

from collections.abc import Callable

from silotune.strategies.base import AggregationRule
from silotune.strategies.rules import FedIT, FedSALoRA, FFALoRA, FlexLoRA, FLoRA, HetLoRA, ZeroPad

_REGISTRY: dict[str, Callable[[], AggregationRule]] = {
    rule.name: rule for rule in (FLoRA, FedIT, ZeroPad, HetLoRA, FlexLoRA, FFALoRA, FedSALoRA)
}


class UnknownStrategyError(ValueError):
    """The requested strategy name is not registered."""


def available() -> list[str]:
    """Names accepted by `create` and by ``--strategy``."""
    return sorted(_REGISTRY)


def create(name: str) -> AggregationRule:
    """Instantiate the aggregation rule registered under `name`."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy '{name}'; valid strategies: {', '.join(available())}"
        ) from None
    return factory()
