"""Validation of silo replies before aggregation: one bad reply never spoils a round.

A reply is accepted only if every array is a LoRA factor of an expected module, the
shapes match the module and the rank the coordinator assigned, all values are finite,
the example count is a positive integer and the update norm ||s B A||_F is at most what
honest training can produce (`derived_bound`, docs/algorithms.md §11). Anything else is
excluded with a reason. Aggregation weights come from the sizes the operator registered
(`aggregation_weights`), never from a number in a reply.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from silotune.adapters.types import (
    AdapterError,
    LoraFactors,
    SiloAdapter,
    modules_from_peft,
    peft_key,
)
from silotune.server.registry import SiloRegistry

log = logging.getLogger(__name__)

# torch.optim.AdamW's default (beta1, beta2): the silos' optimiser (silotune/ml/train.py).
ADAM_BETAS: Final = (0.9, 0.999)
# The derived bound is a worst case over all gradients; the margin only absorbs rounding
# (fp16 on the wire: 2^-11 relative per entry, fp32 optimiser arithmetic), so that an
# honest reply is never excluded by the last bit (docs/algorithms.md §11).
BOUND_MARGIN: Final = 1.5


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


def aggregation_weights(declared: Mapping[str, int | None], registry: SiloRegistry,
                        ) -> dict[str, int]:
    """Each silo's aggregation weight. With a registry (a deployment): the sizes the
    operator registered at enrolment, whatever the replies claim; equal weights for all
    when a silo has none (one warning). Without one (a simulation, whose operator holds
    every silo): the sizes the silos declared (`declared_weights`)."""
    if not registry:
        return declared_weights(declared)
    sizes = {s: (e.examples if (e := registry.get(s)) is not None else None)
             for s in declared}
    unsized = sorted(s for s, n in sizes.items() if n is None)
    if unsized:
        log.warning("equal aggregation weights: no registered size for %s (register one with "
                    "`silotune coordinator register-silo ... --examples N`)", unsized)
    return declared_weights(sizes)


def declared_weights(sizes: Mapping[str, int | None]) -> dict[str, int]:
    """Aggregation weights from public sizes: those sizes when every silo has one, else
    equal weights for all (a size a silo did not declare never leaves it, and mixing the
    two would favour the declared)."""
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
                           " (max-update-norm: derived from the round's training unless set)")
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



def adam_drift(learning_rate: float, steps: int,
               betas: tuple[float, float] = ADAM_BETAS) -> float:
    """The most one coordinate can move in `steps` Adam(W) steps without weight decay,
    whatever the gradients (docs/algorithms.md §11): ``lr * sum_t c_t`` with

    ``c_t = (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) / (1 - b2)) * sqrt((1 - g^t) / (1 - g))``,
    ``g = b1^2 / b2``, the Cauchy-Schwarz bound on Adam's bias-corrected ratio
    ``|m_t| / sqrt(v_t)`` (c_1 = 1; c_t ~ 1.01 for t <= 10 at the default betas).
    Adam's epsilon only shrinks a step."""
    b1, b2 = betas
    g = b1 * b1 / b2
    return learning_rate * sum(
        (1 - b1) / (1 - b1**t) * math.sqrt((1 - b2**t) / (1 - b2))
        * math.sqrt((1 - g**t) / (1 - g)) for t in range(1, steps + 1))


def derived_bound(expected: Expected, drift: float, local: tuple[str, ...] = (),
                  prior_rounds: int = 0) -> float:
    """The largest ||s B A||_F an honest silo can reply (before `BOUND_MARGIN`).

    Every coordinate of an uploaded factor ends within `drift` (`adam_drift`) of the
    plan's start (A0, B0/s as PEFT holds B), so per module
    ``||B A||_F <= ||B||_F ||A||_2 <= (||B0||_F / s + drift sqrt(d_out r)) *
    (||A0||_2 + drift sqrt(r d_in))``; a factor not uploaded is the start (A) or zeros
    (B). A factor kept on the silo (FedSA's B) starts from the silo's own value, which
    `prior_rounds` earlier rounds moved by at most `drift` each. Without a start the silo
    uses PEFT's init: B0 = 0 and A0 Kaiming-uniform, |a| <= 1/sqrt(d_in), ||A0||_2 <=
    sqrt(r). The clip norm, noise multiplier and batch size do not enter: Adam divides
    each coordinate's step by its own gradient scale (docs/algorithms.md §11).
    """
    r, s = expected.rank, abs(expected.scale)
    total = 0.0
    for module, (d_out, d_in) in expected.shapes.items():
        if "B" not in expected.upload:  # B stands in as zeros: no update
            continue
        start = expected.start.get(module) if expected.start is not None else None
        if start is None:
            a0, b0 = math.sqrt(r), 0.0
        else:
            a = np.asarray(start.A[:r], dtype=np.float64)
            a0 = math.sqrt(max(float(np.linalg.eigvalsh(a @ a.T).max()), 0.0))  # ||A0||_2
            b0 = float(np.linalg.norm(np.asarray(start.B[:, :r], dtype=np.float64))) / s
        step_a, step_b = drift * math.sqrt(r * d_in), drift * math.sqrt(d_out * r)
        bound_a = a0 + (step_a if "A" in expected.upload else 0.0) \
            + (prior_rounds * step_a if "A" in local else 0.0)
        bound_b = b0 + step_b + (prior_rounds * step_b if "B" in local else 0.0)
        total += (bound_b * bound_a) ** 2
    return s * math.sqrt(total)
