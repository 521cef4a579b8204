"""Hold-out split and federated partitioning of a labelled frame (``text``, ``label``).

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

__all__ = ["PARTITIONERS", "load_silo", "make_partitioner", "partition", "skewed_sizes",
           "split_holdout"]


def split_holdout(
    df: pd.DataFrame, *, test_fraction: float, seed: int, max_test: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split off a stratified, deterministic test set.

    Parameters
    ----------
    df : pandas.DataFrame
        Rows to split; must have a ``label`` column.
    test_fraction : float
        Target share of rows in the test set, in (0, 1).
    seed : int
        Seed of the row selection; the same seed and frame give the same split.
    max_test : int, optional
        Cap on the test-set size. Every label with at least 2 rows still gets one test
        row, so the test set can exceed a cap smaller than the number of such labels.

    Returns
    -------
    train, test : tuple of pandas.DataFrame
        Disjoint frames that together hold every row of ``df`` (original row order,
        fresh index). Labels with a single row go to ``train``; every other label keeps
        at least one row in each part, and the test rows per label are proportional to
        the label's size (largest-remainder rounding).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if max_test is not None and max_test < 1:
        raise ValueError(f"max_test must be >= 1 or None, got {max_test}")
    counts = df["label"].value_counts().sort_index()
    counts = counts[counts >= 2]
    if counts.empty:
        return df.reset_index(drop=True), df.iloc[:0].reset_index(drop=True)
    sizes = counts.to_numpy()
    target = round(len(df) * test_fraction)
    if max_test is not None:
        target = min(target, max_test)
    target = min(max(target, len(sizes)), int((sizes - 1).sum()))
    alloc = _allocate(sizes, target)

    rng = np.random.default_rng(seed)
    positions = np.arange(len(df))
    labels = df["label"].to_numpy()
    test_mask = np.zeros(len(df), dtype=bool)
    for label, n_test in zip(counts.index, alloc, strict=True):
        rows = positions[labels == label]
        test_mask[rng.choice(rows, size=int(n_test), replace=False)] = True
    return (
        df[~test_mask].reset_index(drop=True),
        df[test_mask].reset_index(drop=True),
    )


def _allocate(sizes: np.ndarray, target: int) -> np.ndarray:
    """Test rows per label: proportional to ``sizes``, each in [1, size - 1]."""
    quota = target * sizes / sizes.sum()
    alloc = np.clip(np.floor(quota), 1, sizes - 1).astype(int)
    # Largest fractional remainder first; ties by position, so the result is stable.
    order = sorted(range(len(sizes)), key=lambda i: (-(quota[i] - np.floor(quota[i])), i))
    while alloc.sum() < target:
        grown = [i for i in order if alloc[i] < sizes[i] - 1][: target - alloc.sum()]
        alloc[grown] += 1
    while alloc.sum() > target:
        shrunk = [i for i in reversed(order) if alloc[i] > 1][: alloc.sum() - target]
        if not shrunk:
            break
        alloc[shrunk] -= 1
    return alloc


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
