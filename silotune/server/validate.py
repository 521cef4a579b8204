"""Validation of silo replies before aggregation: one bad reply never spoils a round.

A reply is accepted only if every array is a LoRA factor of an expected module, the
shapes match the module and the rank the coordinator assigned, all values are finite
and the example count is a positive integer. Anything else is excluded with a reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from silotune.adapters.types import (
    AdapterError,
    LoraFactors,
    SiloAdapter,
    modules_from_peft,
    peft_key,
)


@dataclass(frozen=True)
class Expected:
    """What the coordinator asked a silo to train and send back."""

    rank: int
    scale: float
    shapes: Mapping[str, tuple[int, int]]  # module -> (d_out, d_in)
    upload: tuple[str, ...] = ("A", "B")
    # Factors not uploaded are known to the coordinator: the plan's start (a frozen A);
    # a B that is not uploaded is never read by the rule and stands in as zeros.
    start: Mapping[str, LoraFactors] | None = None
    max_norm: float = float("inf")  # bound on the adapter's update norm ||s B A||_F

    def array_shapes(self) -> dict[str, tuple[int, int]]:
        """The shape of every factor the silo may upload, by PEFT key."""
        factor_shape = {"A": lambda d_out, d_in: (self.rank, d_in),
                        "B": lambda d_out, d_in: (d_out, self.rank)}
        return {peft_key(m, f): factor_shape[f](*shape)
                for m, shape in self.shapes.items() for f in self.upload}


def declared_weights(sizes: Mapping[str, int | None]) -> dict[str, int]:
    """Aggregation weights from the sizes the silos' operators declared public: those
    sizes when every silo declared one, else equal weights for all (a size a silo did
    not declare never leaves it, and mixing the two would favour the declared)."""
    if all(n is not None for n in sizes.values()):
        return {s: int(n) for s, n in sizes.items() if n is not None}
    return dict.fromkeys(sizes, 1)


def validate_reply(silo: str, arrays: Mapping[str, np.ndarray], num_examples: object,
                   expected: Expected) -> SiloAdapter:
    """Return the silo's adapter, or raise `AdapterError` with the reason to report."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int | float) \
            or int(num_examples) != num_examples or num_examples <= 0:
        raise AdapterError(f"example count {num_examples!r} is not a positive integer")
    expected_keys = {peft_key(m, f) for m in expected.shapes for f in expected.upload}
    stray = sorted(set(arrays) - expected_keys)
    if stray and all(k.endswith(".weight") and ".lora_" in k for k in stray):
        raise AdapterError(f"unexpected factors {stray[:3]}: this round uploads lora_"
                           f"{'/'.join(expected.upload)} only")
    modules = modules_from_peft(_complete(arrays, expected))
    if set(modules) != set(expected.shapes):
        missing = sorted(set(expected.shapes) - set(modules))[:3]
        extra = sorted(set(modules) - set(expected.shapes))[:3]
        raise AdapterError(f"adapter modules differ from the assignment (missing {missing}, "
                           f"unexpected {extra})")
    for name, f in modules.items():
        d_out, d_in = expected.shapes[name]
        if f.A.shape != (expected.rank, d_in) or f.B.shape != (d_out, expected.rank):
            raise AdapterError(f"{name}: lora_A {f.A.shape} / lora_B {f.B.shape}, expected "
                               f"({expected.rank}, {d_in}) / ({d_out}, {expected.rank})")
        if f.A.dtype.kind != "f" or f.B.dtype.kind != "f":
            raise AdapterError(f"{name}: factors must be floating point, got {f.A.dtype}")
        if not (np.isfinite(f.A).all() and np.isfinite(f.B).all()):
            raise AdapterError(f"{name}: factors contain NaN or infinite values")
    norm = update_norm(modules.values(), expected.scale)
    if norm > expected.max_norm:
        raise AdapterError(f"update norm {norm:.4g} exceeds the bound {expected.max_norm:.4g}"
                           " (max_update_norm)")
    return SiloAdapter(silo=silo, num_examples=int(num_examples), scale=expected.scale,
                       modules=modules)


def _complete(arrays: Mapping[str, np.ndarray], expected: Expected) -> dict[str, np.ndarray]:
    """Add the factors a rule does not upload, from what the coordinator already knows."""
    full = dict(arrays)
    for module, (d_out, _) in expected.shapes.items():
        if "A" not in expected.upload and expected.start is not None \
                and module in expected.start:
            full[peft_key(module, "A")] = expected.start[module].A[: expected.rank]
        if "B" not in expected.upload:
            full[peft_key(module, "B")] = np.zeros((d_out, expected.rank), np.float32)
    return full


def update_norm(modules: Iterable[LoraFactors], scale: float) -> float:
    """||s B A||_F over all modules, from r x r Gram matrices (no d_out x d_in product)."""
    total = 0.0
    for f in modules:
        a, b = f.A.astype(np.float64), f.B.astype(np.float64)
        total += float(np.trace((b.T @ b) @ (a @ a.T)))  # ||B A||_F^2
    return abs(scale) * float(np.sqrt(max(total, 0.0)))

