"""LoRA factor types: a silo's adapter and low-rank (global) updates.

Pure NumPy; no Flower import. Shapes follow PEFT's `nn.Linear` layout:
``lora_A.weight`` is A with shape (r, d_in), ``lora_B.weight`` is B with shape (d_out, r),
and the adapter adds ``s * B @ A`` (s = alpha / r) to the frozen weight (d_out, d_in).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

# PEFT state-dict key of one factor, e.g.
# "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


class AdapterError(ValueError):
    """An adapter is malformed (missing factor, wrong shape, non-finite values, ...)."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapted module: A (r, d_in) and B (d_out, r), and optionally one weight per
    component, w (r,): the product is then B diag(w) A. FLoRA keeps p_k s_k there so
    that stacking is pure copying and the factors travel exactly as the silos sent them.
    """

    A: np.ndarray
    B: np.ndarray
    w: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def weighted_b(self) -> np.ndarray:
        """B diag(w) in float64 (B itself when there are no weights), (d_out, r)."""
        b = self.B.astype(np.float64)
        return b if self.w is None else b * self.w.astype(np.float64)[None, :]


@dataclass(frozen=True)
class SiloAdapter:
    """A silo's trained adapter and what the aggregation needs to weight it."""

    silo: str
    num_examples: int
    scale: float  # s_k = alpha_k / r_k as used in the silo's forward pass
    modules: Mapping[str, LoraFactors]


@dataclass(frozen=True)
class LowRankUpdate:
    """A global update ``Delta W = scale * B @ A`` per module, to merge into the base."""

    modules: Mapping[str, LoraFactors]
    scale: float = 1.0

    def dense(self, module: str) -> np.ndarray:
        """The dense update of one module, shape (d_out, d_in)."""
        f = self.modules[module]
        return self.scale * (f.weighted_b() @ f.A.astype(np.float64))


def modules_from_peft(arrays: Mapping[str, np.ndarray]) -> dict[str, LoraFactors]:
    """Group PEFT state-dict arrays into per-module (A, B) factors.

    Raises `AdapterError` naming the key when a key is not a LoRA factor, when a module
    lacks one of its factors, or when the shapes of A and B disagree on the rank.
    """
    pieces: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise AdapterError(f"'{key}' is not a LoRA factor (expected '<module>.lora_A.weight')")
        pieces.setdefault(match["module"], {})[match["factor"]] = np.asarray(value)
    modules: dict[str, LoraFactors] = {}
    for module, factors in sorted(pieces.items()):
        if set(factors) != {"A", "B"}:
            missing = ({"A", "B"} - set(factors)).pop()
            raise AdapterError(f"module '{module}' has no lora_{missing} factor")
        a, b = factors["A"], factors["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"module '{module}': lora_A {a.shape} and lora_B {b.shape} do not form a "
                "rank-r pair (A is (r, d_in), B is (d_out, r))"
            )
        modules[module] = LoraFactors(A=a, B=b)
    return modules


def peft_key(module: str, factor: str) -> str:
    """PEFT state-dict key of `factor` ("A" or "B") of `module` (inverse of the parser)."""
    return f"base_model.model.{module}.lora_{factor}.weight"


def is_factor(name: str, factors: tuple[str, ...]) -> bool:
    """Whether a PEFT key or parameter name belongs to one of `factors` ("A", "B")."""
    return any(f".lora_{factor}." in name for factor in factors)
