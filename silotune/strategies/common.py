"""Helpers shared by the rules: which silos hold a module, shapes, padding, truncation.

Pure NumPy over name-keyed factors; inputs are never mutated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from silotune.adapters.types import AdapterError, LoraFactors, SiloAdapter


def module_names(adapters: Sequence[SiloAdapter], rule: str) -> list[str]:
    """Sorted names of the modules trained by at least one adapter.

    Raises `AdapterError` when `adapters` is empty.
    """
    if not adapters:
        raise AdapterError(f"{rule} needs at least one adapter")
    return sorted({m for a in adapters for m in a.modules})


def holders_of(adapters: Sequence[SiloAdapter], module: str) -> list[SiloAdapter]:
    """The adapters that trained `module`, in the order given."""
    return [a for a in adapters if module in a.modules]


def module_shapes(
    module: str, holders: Sequence[SiloAdapter], *, check_b_values: bool = True
) -> tuple[int, int]:
    """Check the holders' factors of `module` and return their common (d_out, d_in).

    Parameters
    ----------
    module : str
        Module name.
    holders : sequence of SiloAdapter
        Adapters that all contain `module` (at least one).
    check_b_values : bool
        Also require finite B values (FedSA-LoRA passes False: it never reads B values).

    Raises
    ------
    AdapterError
        A factor is not 2-D, A and B disagree on the rank, the rank is 0, a value is not
        finite, or two silos disagree on d_out or d_in.
    """
    if not holders:
        raise AdapterError(f"no adapter contains module '{module}'")
    ref: tuple[int, int] | None = None
    for a in holders:
        f = a.modules[module]
        if f.A.ndim != 2 or f.B.ndim != 2 or f.A.shape[0] != f.B.shape[1] or f.rank < 1:
            raise AdapterError(
                f"module '{module}' of silo '{a.silo}': lora_A {f.A.shape} and lora_B "
                f"{f.B.shape} do not form a rank-r pair (A is (r, d_in), B is (d_out, r), r >= 1)"
            )
        if not np.all(np.isfinite(f.A)) or (check_b_values and not np.all(np.isfinite(f.B))):
            raise AdapterError(f"module '{module}' of silo '{a.silo}' has non-finite values")
        dims = (int(f.B.shape[0]), int(f.A.shape[1]))
        if ref is None:
            ref = dims
        elif dims != ref:
            raise AdapterError(
                f"module '{module}': silo '{a.silo}' has (d_out, d_in) = {dims} but silo "
                f"'{holders[0].silo}' has {ref}"
            )
    assert ref is not None
    return ref


def pad_factors(f: LoraFactors, r_max: int) -> LoraFactors:
    """Zero-pad one module's factors to rank `r_max` (new arrays, same dtype).

    A gains r_max - r zero rows and B as many zero columns, so ``B @ A`` is unchanged.
    Raises `AdapterError` when `r_max` is below the current rank.
    """
    extra = r_max - f.rank
    if extra < 0:
        raise AdapterError(f"cannot pad rank {f.rank} down to {r_max}; use truncate_factors")
    return LoraFactors(
        A=np.pad(f.A, ((0, extra), (0, 0))),  # (r_max, d_in)
        B=np.pad(f.B, ((0, 0), (0, extra))),  # (d_out, r_max)
    )


def truncate_factors(f: LoraFactors, r: int) -> LoraFactors:
    """Keep the first `r` components: ``A[:r, :]`` and ``B[:, :r]`` (copies).

    Raises `AdapterError` unless 1 <= r <= the current rank.
    """
    if not 1 <= r <= f.rank:
        raise AdapterError(f"cannot truncate rank {f.rank} to {r} (need 1 <= r <= {f.rank})")
    return LoraFactors(A=f.A[:r, :].copy(), B=f.B[:, :r].copy())  # (r, d_in), (d_out, r)


def weighted_padded_average(
    module: str, holders: Sequence[SiloAdapter], weights: np.ndarray
) -> LoraFactors:
    """sum_k w_k [A_k; 0] and sum_k w_k s_k [B_k | 0] at the largest rank present.

    `weights` (one per holder, non-negative, positive sum) are renormalised to sum to 1.
    Shapes are checked with `module_shapes`. The result is float64 with scale 1.
    """
    d_out, d_in = module_shapes(module, holders)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(holders),) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise AdapterError(f"module '{module}': need one finite, non-negative weight per silo")
    if w.sum() <= 0:
        raise AdapterError(f"module '{module}': the silos' weights sum to zero")
    w = w / w.sum()
    r_max = max(a.modules[module].rank for a in holders)
    a_avg = np.zeros((r_max, d_in))  # (r_max, d_in)
    b_avg = np.zeros((d_out, r_max))  # (d_out, r_max)
    for w_k, a in zip(w, holders, strict=True):
        f = a.modules[module]
        a_avg[: f.rank, :] += w_k * f.A.astype(np.float64)  # (r_k, d_in)
        b_avg[:, : f.rank] += (w_k * a.scale) * f.B.astype(np.float64)  # (d_out, r_k)
    return LoraFactors(A=a_avg, B=b_avg)
