"""The simulated federation's data: a held-out test split and one partition per silo.

Built deterministically from the run config, so the coordinator (which needs the test
split) and every simulated silo (which needs only its own partition) derive the same
split independently, in their own processes, without shipping data around.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import pandas as pd

from silotune.config import RunConfig
from silotune.ml.data import held_out_split
from silotune.simulations.partition import load_silo, make_partitioner

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner


@dataclass(frozen=True)
class FederatedTask:
    """The held-out split and a lazy view of every silo's partition.

    Silo rows are materialised on demand (`silo_frame`), so a process that serves a few
    sampled silos out of 10,000 holds one row-to-silo assignment, not 10,000 frames.
    """

    labels: tuple[str, ...]  # every class, sorted: the answer options scored at evaluation
    test: pd.DataFrame  # held out: no silo trains on these rows
    num_silos: int
    partitioner: Partitioner  # Flower Datasets partitioner over the training rows

    def silo_id(self, index: int) -> str:
        return silo_name(index)

    def silo_frame(self, index: int) -> pd.DataFrame:
        """Silo `index`'s private training rows."""
        if not 0 <= index < self.num_silos:
            raise ValueError(f"silo index {index} out of range [0, {self.num_silos})")
        return load_silo(self.partitioner, index)


def silo_name(index: int) -> str:
    """Stable silo id of simulated silo `index` (zero-padded so ids sort numerically)."""
    return f"silo-{index:03d}"


def federated_task(cfg: RunConfig) -> FederatedTask:
    """The split for `cfg` (cached per process: silos on one worker share it)."""
    return _cached(cfg.dataset, cfg.text_column, cfg.label_column, cfg.num_silos,
                   cfg.partition, cfg.dirichlet_alpha, cfg.test_size, cfg.seed)


@lru_cache(maxsize=4)
def _cached(dataset: str, text_column: str, label_column: str, num_silos: int,
            method: str, alpha: float, test_size: int, seed: int) -> FederatedTask:
    split = held_out_split(dataset, text_column, label_column, test_size, seed)
    train = split.train
    parts = make_partitioner(train, num_partitions=num_silos, method=method, alpha=alpha,
                             seed=seed, min_partition_size=min(10, len(train) // num_silos))
    return FederatedTask(labels=split.labels, test=split.test, num_silos=num_silos,
                         partitioner=parts)
