"""The registry of aggregation rules: each rule module registers its rule by name.

``create("flora")`` returns a fresh rule; an unknown name raises and lists the valid
names; registering a name twice is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from silotune.strategies.base import AggregationRule

R = TypeVar("R", bound=Callable[[], AggregationRule])
_REGISTRY: dict[str, Callable[[], AggregationRule]] = {}


class UnknownStrategyError(ValueError):
    """The requested strategy name is not registered."""


def register(rule: R) -> R:
    """Class decorator: register `rule` under its ``name``."""
    name = rule.name  # type: ignore[attr-defined]
    if name in _REGISTRY:
        raise ValueError(f"strategy '{name}' is registered twice")
    _REGISTRY[name] = rule
    return rule


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
