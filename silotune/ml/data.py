"""A labelled task's held-out split: the rows no silo trains on, named by the operator.

The split depends only on the dataset, its columns, the held-out size and the public
seed, so the coordinator (which evaluates on it) and a simulation (which partitions the
remaining rows over its silos) cut the same split independently.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from silotune.ml.assets import load_dataset_frame


@dataclass(frozen=True)
class HeldOutSplit:
    """Every label of the task, the training rows and the held-out rows."""

    labels: tuple[str, ...]  # every class, sorted: the answer options scored at evaluation
    train: pd.DataFrame
    test: pd.DataFrame  # held out: no silo trains on these rows


@lru_cache(maxsize=4)
def held_out_split(dataset: str, text_column: str, label_column: str, test_size: int,
                   seed: int) -> HeldOutSplit:
    """The split of `dataset` (cached per process) with at most `test_size` held out."""
    frame = load_dataset_frame(dataset, text_column=text_column, label_column=label_column)
    fraction = min(0.5, test_size / len(frame))
    train, test = split_holdout(frame, test_fraction=fraction, seed=seed, max_test=test_size)
    return HeldOutSplit(labels=tuple(sorted(frame["label"].unique())),
                        train=train, test=test.reset_index(drop=True))


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
