"""The simulated federation's data: a held-out test split and one partition per silo.

Built deterministically from the run config, so the coordinator (which needs the test
split) and every simulated silo (which needs only its own partition) derive the same
split independently, in their own processes, without shipping data around.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import pandas as pd

from silotune.assets import load_dataset_frame
from silotune.config import RunConfig
from silotune.simulations.partition import partition, split_holdout


@dataclass(frozen=True)
class FederatedTask:
    labels: tuple[str, ...]  # every class, sorted: the answer options scored at evaluation
    test: pd.DataFrame  # held out: no silo trains on these rows
    silos: tuple[pd.DataFrame, ...]  # one private training partition per silo

    def silo_id(self, index: int) -> str:
        return silo_name(index)


def silo_name(index: int) -> str:
    """Stable silo id of simulated silo `index` (zero-padded so ids sort numerically)."""
    return f"silo-{index:03d}"


def federated_task(cfg: RunConfig) -> FederatedTask:
    """The split for `cfg` (cached per process: silos on one worker share it)."""
    return _cached(cfg.dataset, cfg.text_column, cfg.label_column, cfg.num_silos,
                   cfg.dirichlet_alpha, cfg.test_size, cfg.seed)


@lru_cache(maxsize=4)
def _cached(dataset: str, text_column: str, label_column: str, num_silos: int,
            alpha: float, test_size: int, seed: int) -> FederatedTask:
    frame = load_dataset_frame(dataset, text_column=text_column, label_column=label_column)
    fraction = min(0.5, test_size / len(frame))
    train, test = split_holdout(frame, test_fraction=fraction, seed=seed, max_test=test_size)
    parts = partition(train, num_partitions=num_silos, method="dirichlet", alpha=alpha,
                      seed=seed, min_partition_size=min(10, len(train) // num_silos))
    labels = tuple(sorted(frame["label"].unique()))
    return FederatedTask(labels=labels, test=test.reset_index(drop=True),
                         silos=tuple(p.reset_index(drop=True) for p in parts))
