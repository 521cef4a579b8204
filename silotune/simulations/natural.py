"""Partition by natural group: each silo holds whole groups, or one share of one group.

Models silos that differ by what they see rather than by chance, e.g. specialist
hospitals that each see a few ICD-10 chapters (the "natural id" setting of Flower
Datasets' ``NaturalIdPartitioner`` and of LEAF's writer split, Caldas et al., 2018,
extended to any number of silos):

- ``num_partitions <= groups``: every group goes whole to one silo (each group is on
  exactly one silo); groups, in a seeded random order, go to the silo with the fewest
  rows so far.
- ``num_partitions > groups``: every silo holds rows of exactly one group; groups get
  silos in proportion to their size (at least one each), and a group's rows, seeded
  shuffled, are split evenly between its silos.
"""

from __future__ import annotations

import datasets
import numpy as np
from flwr_datasets.partitioner import Partitioner


class NaturalGroupPartitioner(Partitioner):
    """Flower Datasets partitioner: silos made of whole natural groups (see module doc).

    Parameters
    ----------
    num_partitions : int
        Number of silos.
    partition_by : str
        Column holding the group of each row (e.g. ``"label"``: the ICD chapter).
    seed : int
        Seed of the group order and of the row split inside a group.
    min_partition_size : int
        Smallest allowed silo; a split that cannot meet it raises ValueError.
    """

    def __init__(self, num_partitions: int, partition_by: str, seed: int,
                 min_partition_size: int = 1) -> None:
        super().__init__()
        if num_partitions < 1:
            raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
        self._num_partitions = num_partitions
        self._partition_by = partition_by
        self._seed = seed
        self._min_size = min_partition_size
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return self._num_partitions

    @property
    def partition_id_to_indices(self) -> dict[int, list[int]]:
        """Row indices of every silo (the result of partitioning)."""
        return {i: rows.tolist() for i, rows in enumerate(self._assign())}

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        """The rows of silo `partition_id`."""
        return self.dataset.select(self._assign()[partition_id])

    def _assign(self) -> list[np.ndarray]:
        if self._indices is not None:
            return self._indices
        values = np.asarray(self.dataset[self._partition_by])
        groups, codes = np.unique(values, return_inverse=True)
        rng = np.random.default_rng(self._seed)
        members = [np.flatnonzero(codes == g) for g in range(len(groups))]
        n = self._num_partitions
        if n <= len(groups):
            silos: list[list[int]] = [[] for _ in range(n)]
            sizes = np.zeros(n, dtype=int)
            for g in rng.permutation(len(groups)):
                k = int(np.argmin(sizes))
                silos[k].append(int(g))
                sizes[k] += len(members[g])
            indices = [np.sort(np.concatenate([members[g] for g in s])) for s in silos]
        else:
            counts = _silos_per_group(np.array([len(m) for m in members]), n)
            indices = []
            for rows, k in zip(members, counts, strict=True):
                indices += [np.sort(part) for part in np.array_split(rng.permutation(rows), k)]
        smallest = min(len(i) for i in indices)
        if smallest < self._min_size:
            raise ValueError(
                f"natural-group partitioning by '{self._partition_by}' ({len(groups)} "
                f"groups) gives a silo only {smallest} rows, fewer than the minimum "
                f"{self._min_size}; use fewer silos, a smaller min_partition_size, or "
                "another partition method")
        self._indices = indices
        return indices


def _silos_per_group(sizes: np.ndarray, num_silos: int) -> np.ndarray:
    """Silos per group: proportional to `sizes`, each >= 1, summing to `num_silos`."""
    quota = num_silos * sizes / sizes.sum()
    counts = np.maximum(1, np.floor(quota)).astype(int)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    i = 0
    while counts.sum() < num_silos:
        counts[order[i % len(order)]] += 1
        i += 1
    while counts.sum() > num_silos:  # flooring at 1 overshot: take from the largest
        counts[int(np.argmax(counts))] -= 1
    return counts
