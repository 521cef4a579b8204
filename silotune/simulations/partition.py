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

__all__ = ["PARTITIONERS", "partition", "split_holdout"]


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


def _iid(num_partitions: int, *, alpha: float, seed: int, min_partition_size: int) -> Partitioner:
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=num_partitions)


def _dirichlet(
    num_partitions: int, *, alpha: float, seed: int, min_partition_size: int
) -> Partitioner:
    from flwr_datasets.partitioner import DirichletPartitioner

    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_partition_size,
        self_balancing=True,
        seed=seed,
    )


# name -> factory(num_partitions, *, alpha, seed, min_partition_size) -> flwr Partitioner
PARTITIONERS: dict[str, Callable[..., Partitioner]] = {
    "iid": _iid,  # uniform random shards (the frame is shuffled with ``seed`` first)
    "dirichlet": _dirichlet,  # label skew: per-label silo shares ~ Dirichlet(alpha)
}


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
        A key of :data:`PARTITIONERS`: ``"iid"`` or ``"dirichlet"`` (default).
    alpha : float, optional
        Dirichlet concentration (``"dirichlet"`` only): small values give each silo a
        few dominant labels, large values approach IID.
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
        Unknown method, ``num_partitions`` out of range, or a Dirichlet split that
        cannot give every silo ``min_partition_size`` rows.
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

    if method == "iid":
        order = np.random.default_rng(seed).permutation(len(df))
        df = df.iloc[order]
    ds = datasets.Dataset.from_pandas(df.reset_index(drop=True), preserve_index=False)
    partitioner = PARTITIONERS[method](
        num_partitions, alpha=alpha, seed=seed, min_partition_size=min_partition_size
    )
    partitioner.dataset = ds
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one warning per Dirichlet resampling try
            parts = [partitioner.load_partition(i) for i in range(num_partitions)]
    except ValueError as exc:
        if "attempts" not in str(exc):
            raise
        raise ValueError(
            f"Dirichlet partitioning (alpha={alpha}) could not give each of "
            f"{num_partitions} silos at least {min_partition_size} rows after 10 tries; "
            "use a larger alpha (less label skew), fewer silos, or a smaller "
            "min_partition_size"
        ) from exc
    return [p.to_pandas().reset_index(drop=True) for p in parts]
