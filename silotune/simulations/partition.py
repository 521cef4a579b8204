"""Federated partitioning of a labelled frame (``text``, ``label``) over simulated silos.

Partitioning uses Flower Datasets partitioners directly on local data (no Hub access):
the frame becomes a :class:`datasets.Dataset`, the partitioner is given it, and each
silo's partition comes back as a frame with the same columns.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner

__all__ = ["PARTITIONERS", "load_silo", "make_partitioner", "partition", "skewed_sizes"]


def _iid(num_partitions: int, *, alpha: float, seed: int, min_partition_size: int,
         num_rows: int) -> Partitioner:
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=num_partitions)


def _dirichlet(num_partitions: int, *, alpha: float, seed: int, min_partition_size: int,
               num_rows: int) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner

    _check_alpha(alpha, "dirichlet")
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_partition_size,
        self_balancing=True,
        seed=seed,
    )


def _natural(num_partitions: int, *, alpha: float, seed: int, min_partition_size: int,
             num_rows: int) -> Partitioner:
    from silotune.simulations.natural import NaturalGroupPartitioner

    return NaturalGroupPartitioner(num_partitions=num_partitions, partition_by="label",
                                   seed=seed, min_partition_size=min_partition_size)


def _size(num_partitions: int, *, alpha: float, seed: int, min_partition_size: int,
          num_rows: int) -> Partitioner:
    from flwr_datasets.partitioner import SizePartitioner

    _check_alpha(alpha, "size")
    return SizePartitioner(skewed_sizes(num_rows, num_partitions, alpha=alpha, seed=seed,
                                        min_size=max(1, min_partition_size)))


def _check_alpha(alpha: float, method: str) -> None:
    if not alpha > 0:
        raise ValueError(f"{method} alpha must be > 0, got {alpha}")


def skewed_sizes(num_rows: int, num_partitions: int, *, alpha: float, seed: int,
                 min_size: int) -> list[int]:
    """Quantity skew: silo sizes ``min_size + Multinomial(rest, Dirichlet(alpha))``.

    The size-skew setting of Li et al., "Federated Learning on Non-IID Data Silos: An
    Experimental Study" (ICDE 2022, quantity skew ``q ~ Dir_N(beta)``): small ``alpha``
    gives a few large silos and many small ones, large ``alpha`` near-equal sizes. The
    sizes sum to ``num_rows`` and each is at least ``min_size``.
    """
    rest = num_rows - num_partitions * min_size
    if rest < 0:
        raise ValueError(f"{num_rows} rows cannot fill {num_partitions} silos of at least "
                         f"{min_size} rows; use fewer silos or a smaller min_partition_size")
    rng = np.random.default_rng(seed)
    shares = rng.dirichlet(np.full(num_partitions, float(alpha)))
    extra = rng.multinomial(rest, shares / shares.sum())
    return [int(min_size + e) for e in extra]


# name -> factory(num_partitions, *, alpha, seed, min_partition_size, num_rows)
#         -> a Flower Datasets Partitioner (its dataset not yet assigned)
PARTITIONERS: dict[str, Callable[..., Partitioner]] = {
    "iid": _iid,  # uniform random shards (the frame is shuffled with ``seed`` first)
    "dirichlet": _dirichlet,  # label skew: per-label silo shares ~ Dirichlet(alpha)
    "natural": _natural,  # by natural group (the label, e.g. ICD chapter): whole groups
    "size": _size,  # quantity skew: silo sizes ~ Dirichlet(alpha), labels IID
}
_SHUFFLED = ("iid", "size")  # methods that cut a seeded permutation of the rows


def make_partitioner(
    df: pd.DataFrame,
    *,
    num_partitions: int,
    method: str = "dirichlet",
    alpha: float = 0.5,
    seed: int,
    min_partition_size: int = 10,
) -> Partitioner:
    """A Flower Datasets partitioner of ``df``, ready for ``load_partition(i)``.

    Lazy: each silo's rows are materialised only when that silo asks for them (see
    :func:`load_silo`), so 10,000 silos cost one index assignment, not 10,000 frames.
    Parameters and errors as :func:`partition`.
    """
    if method not in PARTITIONERS:
        raise ValueError(
            f"unknown partition method {method!r}; valid: {', '.join(sorted(PARTITIONERS))}"
        )
    if not 1 <= num_partitions <= len(df):
        raise ValueError(f"num_partitions must be in [1, {len(df)}] (rows), got {num_partitions}")
    if num_partitions * min_partition_size > len(df):
        raise ValueError(
            f"{len(df)} rows cannot fill {num_partitions} silos of at least "
            f"{min_partition_size} rows; use fewer silos or a smaller min_partition_size"
        )
    import datasets

    if method in _SHUFFLED:
        order = np.random.default_rng(seed).permutation(len(df))
        df = df.iloc[order]
    partitioner = PARTITIONERS[method](
        num_partitions, alpha=alpha, seed=seed, min_partition_size=min_partition_size,
        num_rows=len(df),
    )
    partitioner.dataset = datasets.Dataset.from_pandas(df.reset_index(drop=True),
                                                       preserve_index=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one warning per Dirichlet resampling try
            partitioner.load_partition(0)  # assigns every row now: errors surface here
    except ValueError as exc:
        if "attempts" not in str(exc):
            raise
        raise ValueError(
            f"Dirichlet partitioning (alpha={alpha}) could not give each of "
            f"{num_partitions} silos at least {min_partition_size} rows after 10 tries; "
            "use a larger alpha (less label skew), fewer silos, or a smaller "
            "min_partition_size"
        ) from exc
    return partitioner


def load_silo(partitioner: Partitioner, index: int) -> pd.DataFrame:
    """Silo ``index``'s rows as a frame with a fresh index."""
    frame: pd.DataFrame = partitioner.load_partition(index).to_pandas()
    return frame.reset_index(drop=True)


def partition(
    df: pd.DataFrame,
    *,
    num_partitions: int,
    method: str = "dirichlet",
    alpha: float = 0.5,
    seed: int,
    min_partition_size: int = 10,
) -> list[pd.DataFrame]:
    """Split ``df`` into ``num_partitions`` disjoint silo frames with Flower Datasets.

    Parameters
    ----------
    df : pandas.DataFrame
        Rows to split; must have a ``label`` column. Other columns are kept.
    num_partitions : int
        Number of silos, from 1 to ``len(df)``.
    method : str, optional
        A key of :data:`PARTITIONERS`: ``"iid"``, ``"dirichlet"`` (default),
        ``"natural"`` (whole label groups per silo) or ``"size"`` (quantity skew).
    alpha : float, optional
        Dirichlet concentration (``"dirichlet"``: of each label's shares over silos;
        ``"size"``: of the silo sizes): small values give strong skew, large values
        approach IID.
    seed : int
        Seed of the partitioning; the same seed and frame give the same partitions.
    min_partition_size : int, optional
        Smallest allowed silo; Dirichlet resamples (up to 10 times) to meet it.

    Returns
    -------
    list of pandas.DataFrame
        One frame per silo with fresh indices; together they hold every row once.

    Raises
    ------
    ValueError
        Unknown method, ``num_partitions`` out of range, or a split that cannot give
        every silo ``min_partition_size`` rows.
    """
    partitioner = make_partitioner(df, num_partitions=num_partitions, method=method,
                                   alpha=alpha, seed=seed,
                                   min_partition_size=min_partition_size)
    return [load_silo(partitioner, i) for i in range(num_partitions)]
