"""Field codecs and checks of the protocol's messages (`silotune.protocol.messages`).

Every value a message carries is read here: numbers must be finite (``inf`` only where a
field allows it), integers integral, JSON well formed, silo ids names; a `Range` bounds
what a numeric field may be. A failure raises `MessageError` naming the field, so that a
malformed reply costs only its sender (docs/architecture.md, "Trust boundary").
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from silotune.protocol import keys as P


class MessageError(ValueError):
    """A message field is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class Range:
    """The values a numeric field may take: ``[lo, hi]``, either end open."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:  # NaN is in no range
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        return (f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                f"{')' if self.hi_open or math.isinf(self.hi) else ']'}")


COUNT = Range(1)  # a number of things: steps, examples, tokens
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, lo_open=True)
PROBABILITY = Range(0, 1)
OPEN_UNIT = Range(0, 1, lo_open=True, hi_open=True)  # delta
SILO_ID_MAX = 128  # characters
EPSILON_SLACK = 1e-6  # relative: accountants' rounding, never a budget overrun


def check_silo_id(value: str, key: str = P.SILO_ID) -> None:
    """A silo id is a name: non-empty, short, no whitespace, quotes or slashes (it names
    ledgers, metrics keys and the registry's entries)."""
    if not value or len(value) > SILO_ID_MAX or any(
            c.isspace() or c in "'\"/\\" or not c.isprintable() for c in value):
        raise MessageError(f"message field '{key}' = {value[:SILO_ID_MAX]!r} is not a silo "
                           f"name (1-{SILO_ID_MAX} printable characters, no whitespace, "
                           "quotes or slashes)")


def encode(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict | list) and not (
            isinstance(value, list) and all(isinstance(v, float) for v in value)):
        return json.dumps(value, allow_nan=False)
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def optional_inner(hint: Any) -> Any:
    """``X`` of ``X | None`` (other hints as they are)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def decode(raw: Any, hint: Any, key: str, allow_inf: bool) -> Any:
    hint = optional_inner(hint)
    kind = typing.get_origin(hint)
    if hint is bool:
        return bool(read_int(raw, key))
    if hint is int:
        return read_int(raw, key)
    if hint is float:
        return read_float(raw, key, allow_inf)
    if hint is str:
        return str(raw)
    if kind is tuple:
        return tuple(part for part in str(raw).split(",") if part)
    if kind is list and typing.get_args(hint) == (float,) and isinstance(raw, list):
        return [read_float(v, key, False) for v in raw]
    if kind in (list, dict):
        try:
            value = json.loads(str(raw))
        except json.JSONDecodeError as err:
            raise MessageError(f"message field '{key}' is not valid JSON: {err}") from None
        if not isinstance(value, kind):
            raise MessageError(f"message field '{key}' must be a JSON {kind.__name__}")
        return value
    raise TypeError(f"no decoder for message field '{key}' of type {hint}")


def own_record(key: str, record: Mapping[str, Any], hint: Any) -> dict[str, Any]:
    if typing.get_args(optional_inner(hint))[1] is float:
        return {str(k): read_float(v, f"{key}/{k}", False) for k, v in record.items()}
    return {str(k): v for k, v in record.items()}


def read_int(raw: Any, key: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise MessageError(f"message field '{key}' = {raw!r} is not an integer")
    try:
        value = float(raw)
    except ValueError:
        raise MessageError(f"message field '{key}' = {raw!r} is not an integer") from None
    if not math.isfinite(value) or not value.is_integer():
        raise MessageError(f"message field '{key}' = {raw!r} is not a finite integer")
    return int(value)


def read_float(raw: Any, key: str, allow_inf: bool) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise MessageError(f"message field '{key}' = {raw!r} is not a number")
    try:
        value = float(raw)
    except ValueError:
        raise MessageError(f"message field '{key}' = {raw!r} is not a number") from None
    if math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0)):
        raise MessageError(f"message field '{key}' = {raw!r} is not finite")
    return value
