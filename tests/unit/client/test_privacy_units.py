"""Patient-level privacy on a silo (privacy-unit-column): batches are Poisson-sampled over
patients, the ledger accounts per patient with the patients' sampling rate, and releases
that treat a row as the unit are refused."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from silotune.client.app import build_client_app
from silotune.client.node import NodeConfigError, NodeSettings, from_node_config
from silotune.client.policy import SiloPolicy
from silotune.ml.assets import AssetError, load_dataset_frame
from silotune.ml.dp_sgd import sample_rate_for
from silotune.privacy.accounting import AccountingStep
from silotune.privacy.audit import independent_check
from silotune.privacy.ledger import read_entries, verify_ledger
from silotune.protocol import keys as P
from tests.unit.client.test_sovereign_silo import (  # noqa: F401 (the autouse fixture)
    _cfg,
    _context,
    _importance_msg,
    _reason,
    _source,
    _task_identity,
    _train_msg,
)

POLICY = SiloPolicy(8.0, 1e-5, max_steps=10, importance_queries=1,
                    privacy_unit_column="patient_id")


def _patients(frame: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """`frame` with a unit column: patients of 1 to 20 rows each."""
    rng, units, patient = random.Random(seed), [], 0
    while len(units) < len(frame):
        units += [f"p{patient}"] * rng.randint(1, 20)
        patient += 1
    return frame.assign(unit=units[:len(frame)])


def test_the_ledger_accounts_per_patient_at_the_patients_sampling_rate(
        tiny_model_dir, toy_dataset_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    base = _source(cfg, POLICY)(_context())
    grouped = _patients(base.frame)
    source = _source(cfg, POLICY, load_data=lambda: grouped)
    reply = build_client_app(source)(_train_msg(cfg, local_steps=2), _context())
    assert not reply.has_error(), _reason(reply)

    [entry] = read_entries(base.ledger_path)
    patients = grouped["unit"].nunique()
    assert 1 < patients < len(grouped)
    assert entry["privacy_unit"] == "group:patient_id"
    assert entry["privacy_units"] == patients and entry["dataset_size"] == len(grouped)
    q = sample_rate_for(patients, cfg.batch_size)  # batches count patients
    history = [AccountingStep.from_dict(d) for d in entry["accounting_history"]]
    assert history == [AccountingStep(entry["noise_multiplier"], q, 2)]
    values, problem = independent_check(history, POLICY.delta, entry["epsilon"],
                                        entry["accountant"])
    assert problem is None and entry["epsilon"] == pytest.approx(values["pld"], rel=0.02)
    assert verify_ledger(base.ledger_path) == []


def test_a_per_row_release_is_refused_when_the_unit_spans_rows(tiny_model_dir,
                                                              toy_dataset_file, tmp_path):
    cfg = _cfg(tmp_path, tiny_model_dir, toy_dataset_file)
    source = _source(cfg, POLICY)
    refused = build_client_app(source)(_importance_msg(tiny_model_dir), _context())
    assert refused.has_error() and refused.error.code == P.ERROR_POLICY, _reason(refused)
    assert "group:patient_id" in _reason(refused)
    assert not source(_context()).ledger_path.exists()


def test_the_unit_column_is_read_from_the_file_and_the_node_config(tmp_path):
    path = tmp_path / "notes.csv"
    pd.DataFrame({"note": ["a b", "c d", "e f"], "code": ["x", "y", "x"],
                  "patient": [7, 7, 9]}).to_csv(path, index=False)
    frame = load_dataset_frame(str(path), text_column="note", label_column="code",
                               unit_column="patient")
    assert list(frame.columns) == ["text", "label", "unit"]
    assert frame["unit"].tolist() == ["7", "7", "9"]
    pd.DataFrame({"note": ["a", "b"], "code": ["x", "y"], "patient": [1, None]}).to_csv(
        path, index=False)
    with pytest.raises(AssetError, match="1 rows have no value in the privacy unit column"):
        load_dataset_frame(str(path), text_column="note", label_column="code",
                           unit_column="patient")

    node = NodeSettings(silo_id="a", data_path=path, state_dir=tmp_path, epsilon=8.0,
                        delta=1e-5, privacy_unit_column="patient")
    config = dict(part.split("=", 1) for part in node.to_node_config().split(" "))
    config = {k: v.strip('"') for k, v in config.items()}
    assert from_node_config(config).policy.privacy_unit == "group:patient"
    with pytest.raises(NodeConfigError, match="other than the text and the label"):
        NodeSettings(silo_id="a", data_path=path, state_dir=tmp_path, epsilon=8.0,
                     delta=1e-5, privacy_unit_column="text")
