"""Tests for silotune.simulations.partition: hold-out split and silo partitioning."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from silotune.ml.data import split_holdout
from silotune.simulations.partition import (
    PARTITIONERS,
    load_silo,
    make_partitioner,
    partition,
    skewed_sizes,
)


def _frame(sizes: dict[str, int]) -> pd.DataFrame:
    rows = [(f"{label} note {i}", label) for label, n in sizes.items() for i in range(n)]
    frame = pd.DataFrame(rows, columns=["text", "label"])
    frame.insert(0, "id", range(len(frame)))
    return frame


@pytest.fixture
def df() -> pd.DataFrame:
    return _frame({"a": 100, "b": 40, "c": 17, "d": 5, "e": 2, "f": 1})


def _ids(frame: pd.DataFrame) -> set[int]:
    return set(frame["id"].tolist())


def test_holdout_disjoint_covering_stratified(df: pd.DataFrame) -> None:
    train, test = split_holdout(df, test_fraction=0.2, seed=0)
    assert not _ids(train) & _ids(test)
    assert _ids(train) | _ids(test) == _ids(df)
    assert len(test) == round(0.2 * len(df))
    per_label = test["label"].value_counts()
    for label, n in df["label"].value_counts().items():
        if n >= 2:  # every such label in both parts, roughly proportional
            assert 1 <= per_label[label] <= n - 1
            assert abs(per_label[label] - 0.2 * n) <= 1.5
    assert "f" not in per_label  # a single row stays in train
    assert list(test.columns) == list(df.columns)
    assert train["id"].is_monotonic_increasing and test["id"].is_monotonic_increasing


def test_holdout_deterministic(df: pd.DataFrame) -> None:
    first = split_holdout(df, test_fraction=0.2, seed=3)
    again = split_holdout(df, test_fraction=0.2, seed=3)
    other = split_holdout(df, test_fraction=0.2, seed=4)
    assert first[1].equals(again[1]) and first[0].equals(again[0])
    assert _ids(first[1]) != _ids(other[1])


def test_holdout_max_test(df: pd.DataFrame) -> None:
    _, test = split_holdout(df, test_fraction=0.5, seed=0, max_test=20)
    assert len(test) == 20 and test["label"].nunique() == 5
    # A cap below the number of labels with >= 2 rows still gives each one test row.
    _, tiny = split_holdout(df, test_fraction=0.5, seed=0, max_test=2)
    assert sorted(tiny["label"]) == ["a", "b", "c", "d", "e"]


def test_holdout_bad_arguments(df: pd.DataFrame) -> None:
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            split_holdout(df, test_fraction=fraction, seed=0)
    with pytest.raises(ValueError, match="max_test"):
        split_holdout(df, test_fraction=0.1, seed=0, max_test=0)


@pytest.mark.parametrize("method", sorted(PARTITIONERS))
def test_partitions_disjoint_and_covering(method: str) -> None:
    df = _frame({"a": 60, "b": 40, "c": 30, "d": 20, "e": 12, "f": 10})
    parts = partition(df, num_partitions=4, method=method, alpha=1.0, seed=0)
    assert len(parts) == 4
    ids = [_ids(p) for p in parts]
    assert sum(len(s) for s in ids) == len(df)
    assert set().union(*ids) == _ids(df)
    assert all(len(p) >= 10 for p in parts)
    assert all(list(p.columns) == list(df.columns) for p in parts)
    again = partition(df, num_partitions=4, method=method, alpha=1.0, seed=0)
    assert all(a.equals(b) for a, b in zip(parts, again, strict=True))
    other = partition(df, num_partitions=4, method=method, alpha=1.0, seed=1)
    assert [_ids(p) for p in other] != ids


def test_iid_is_shuffled(df: pd.DataFrame) -> None:
    parts = partition(df, num_partitions=3, method="iid", seed=0)
    assert all(p["label"].nunique() >= 3 for p in parts)  # not contiguous label blocks
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def _mean_tv(parts: list[pd.DataFrame], labels: list[str]) -> float:
    total = pd.concat(parts)["label"].value_counts(normalize=True).reindex(labels, fill_value=0)
    dists = [p["label"].value_counts(normalize=True).reindex(labels, fill_value=0) for p in parts]
    return float(np.mean([0.5 * (d - total).abs().sum() for d in dists]))


def test_dirichlet_alpha_controls_skew() -> None:
    data = _frame({f"l{k}": 100 for k in range(10)})
    labels = sorted(data["label"].unique())
    skewed = _mean_tv(partition(data, num_partitions=5, alpha=0.1, seed=0), labels)
    near_iid = _mean_tv(partition(data, num_partitions=5, alpha=100.0, seed=0), labels)
    assert near_iid < 0.15
    assert skewed > near_iid + 0.3


def test_partition_errors(df: pd.DataFrame) -> None:
    with pytest.raises(
        ValueError, match="unknown partition method 'shards'; valid: dirichlet, iid"
    ):
        partition(df, num_partitions=2, method="shards", seed=0)
    for n in (0, len(df) + 1):
        with pytest.raises(ValueError, match="num_partitions"):
            partition(df, num_partitions=n, seed=0, min_partition_size=0)
    with pytest.raises(ValueError, match="fewer silos"):
        partition(df, num_partitions=20, seed=0)  # 20 x 10 > 165 rows
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition(df, num_partitions=2, alpha=0.0, seed=0)


def test_dirichlet_unsatisfiable_min_size_is_explained() -> None:
    data = _frame({"a": 50, "b": 50})
    with pytest.raises(ValueError, match="larger alpha"):
        partition(data, num_partitions=10, alpha=0.1, seed=0, min_partition_size=10)


def test_lazy_partitioner_gives_the_same_silos() -> None:
    data = _frame({f"l{k}": 30 for k in range(4)})
    for method in sorted(PARTITIONERS):
        parts = partition(data, num_partitions=6, method=method, seed=2)
        lazy = make_partitioner(data, num_partitions=6, method=method, seed=2)
        for i in (5, 0, 3):  # any order, on demand
            assert load_silo(lazy, i).equals(parts[i]), method


def test_natural_groups_fewer_silos_than_groups() -> None:
    data = _frame({f"l{k}": 20 + 5 * k for k in range(10)})
    parts = partition(data, num_partitions=4, method="natural", seed=0)
    owners = {label: [i for i, p in enumerate(parts) if label in set(p["label"])]
              for label in data["label"].unique()}
    assert all(len(o) == 1 for o in owners.values())  # each group whole on one silo
    for label, (owner,) in owners.items():  # with all of its rows
        assert (parts[owner]["label"] == label).sum() == (data["label"] == label).sum()
    sizes = sorted(len(p) for p in parts)
    assert sum(sizes) == len(data) and sizes[-1] - sizes[0] <= 65  # greedy keeps balance


def test_natural_groups_more_silos_than_groups() -> None:
    data = _frame({"big": 120, "mid": 60, "small": 20})
    parts = partition(data, num_partitions=10, method="natural", seed=0, min_partition_size=5)
    assert all(p["label"].nunique() == 1 for p in parts)  # one group per silo
    per_group = pd.Series([p["label"].iloc[0] for p in parts]).value_counts()
    assert per_group.to_dict() == {"big": 6, "mid": 3, "small": 1}  # proportional to size
    assert set().union(*(_ids(p) for p in parts)) == _ids(data)
    assert sum(len(p) for p in parts) == len(data)


def test_natural_groups_too_small_is_explained() -> None:
    with pytest.raises(ValueError, match=r"natural-group.*fewer silos"):
        partition(_frame({"a": 100, "b": 3}), num_partitions=2, method="natural", seed=0)


def test_size_alpha_controls_quantity_skew() -> None:
    data = _frame({f"l{k}": 200 for k in range(5)})
    labels = sorted(data["label"].unique())

    def spread(alpha: float) -> float:
        sizes = np.array([len(p) for p in partition(data, num_partitions=10, method="size",
                                                    alpha=alpha, seed=0)])
        return float(sizes.std() / sizes.mean())

    assert spread(0.1) > 1.0 > 0.15 > spread(100.0)  # few big silos vs near-equal sizes
    near_iid = partition(data, num_partitions=10, method="size", alpha=100.0, seed=0)
    assert _mean_tv(near_iid, labels) < 0.2  # labels stay mixed: only the sizes are skewed


def test_skewed_sizes_sum_and_minimum() -> None:
    sizes = skewed_sizes(1000, 50, alpha=0.05, seed=1, min_size=3)
    assert sum(sizes) == 1000 and min(sizes) >= 3 and max(sizes) > 100
    with pytest.raises(ValueError, match="cannot fill"):
        skewed_sizes(10, 5, alpha=1.0, seed=0, min_size=3)
