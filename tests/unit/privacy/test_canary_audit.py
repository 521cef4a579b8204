"""Empirical one-run audit (Dirac gradient canaries) on the tiny model: power, soundness,
negative control, the signed ledger entry, and `silotune audit --empirical`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from silotune.cli import main
from silotune.client.silo import SiloPrivacy, SiloPrivacyConfig
from silotune.ml.dp_sgd import DPConfig
from silotune.ml.lm import encode, load_model
from silotune.ml.train import LocalTrainConfig
from silotune.privacy.accounting import AccountingStep
from silotune.privacy.canary_audit import empirical_audit
from silotune.privacy.ledger import verify_ledger
from silotune.privacy.one_run_audit import check_audit_entry
from tests.conftest import toy_frame

SEED = b"silotune-canary-test-seed"
M = 500  # of 1,792 trainable LoRA parameters (rank 8 on q_proj, v_proj of the tiny model)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    df = toy_frame(64)
    examples = [encode(tok, t, lab) for t, lab in zip(df.text, df.label, strict=True)]
    cfg = LocalTrainConfig(rank=8, alpha=16.0, targets=("q_proj", "v_proj"), local_steps=12,
                           batch_size=16, physical_batch_size=16, learning_rate=0.01,
                           init_seed=3)
    return model, tok, examples, cfg


def _audit(setup, sigma: float, insert: bool = True, steps: int = 12):
    model, tok, examples, cfg = setup
    cfg = dataclasses.replace(cfg, local_steps=steps)
    return empirical_audit(model, examples, tok.pad_token_id, cfg, DPConfig(sigma, 1.0),
                           canaries=M, delta=1e-5, insert=insert, seed=SEED)


def test_noise_off_detects_leakage(setup):
    """Positive control: sigma 0 (clipping on) -> inserted canaries stand out."""
    audit = _audit(setup, 0.0)
    assert audit.eps_accounted is None and audit.sound
    assert audit.result.eps_lower_bound > 2.0  # measured 3.59
    assert audit.result.auc is not None and audit.result.auc > 0.9
    assert 0 < audit.inserted_canaries < M


def test_dp_on_stays_below_accounted_epsilon(setup):
    """Soundness: sigma 1 -> the lower bound is below the PRV epsilon of the same run."""
    audit = _audit(setup, 1.0)
    assert audit.sample_rate == pytest.approx(0.25) and audit.steps == 12
    assert audit.eps_accounted is not None and audit.eps_accounted > 1.0
    assert audit.result.eps_lower_bound < audit.eps_accounted
    assert audit.sound


def test_never_inserted_canaries_give_zero(setup):
    audit = _audit(setup, 0.0, insert=False, steps=6)
    assert audit.inserted_canaries == 0
    assert audit.result.eps_lower_bound == 0.0


def test_too_many_canaries_for_the_adapter_is_refused(setup):
    model, tok, examples, cfg = setup
    with pytest.raises(ValueError, match="1792 trainable parameters"):
        empirical_audit(model, examples, tok.pad_token_id, cfg, DPConfig(1.0, 1.0),
                        canaries=5000, delta=1e-5, seed=SEED)


def _entry(**kw):
    base = {"m": 1000, "r": 100, "v": 100, "delta": 1e-5, "significance": 0.05,
            "k_grid_size": 1, "eps_lower_bound": 3.465, "noise_multiplier": 0.0,
            "sample_rate": 0.01, "steps": 100, "eps_accounted": None}
    base.update(kw)
    return base


def test_audit_entry_check_recomputes_bound_and_flags_leakage():
    from silotune.privacy.one_run_audit import epsilon_lower_bound

    bound = epsilon_lower_bound(m=1000, r=100, v=100, delta=1e-5)
    assert check_audit_entry(_entry(eps_lower_bound=bound)) == []
    wrong = check_audit_entry(_entry(eps_lower_bound=bound + 0.5))
    assert len(wrong) == 1 and wrong[0].startswith("eps_lower_bound: stored")
    # sigma 10, q 0.01, 100 steps accounts for a tiny epsilon: 100/100 correct is a violation
    from silotune.privacy.accounting import compute_epsilon

    eps = compute_epsilon([AccountingStep(10.0, 0.01, 100)], 1e-5, cross_check=False).epsilon
    leak = check_audit_entry(_entry(eps_lower_bound=bound, noise_multiplier=10.0,
                                    eps_accounted=eps))
    assert any("leaks more than it accounts" in p for p in leak)
    assert any("eps_accounted" in p for p in check_audit_entry(
        _entry(eps_lower_bound=bound, noise_multiplier=10.0, eps_accounted=eps * 2)))


def test_cli_empirical_audit_appends_a_verified_entry(tiny_model_dir, toy_dataset_file,
                                                      tmp_path, capsys):
    """`silotune audit --empirical` on silo 0, sigma from its ledger; then `silotune audit`
    verifies the chain including the audit entry, and a tampered bound is caught."""
    ledger, key = tmp_path / "silo-000.jsonl", tmp_path / "key.pem"
    silo = SiloPrivacy(SiloPrivacyConfig(silo_id="silo-000", target_epsilon=8.0, delta=1e-5,
                                         max_grad_norm=1.0, ledger_path=ledger, key_path=key))
    silo.record_round(step=AccountingStep(1.0, 0.25, 10), run_id="r", round_=1,
                      frame=pd.DataFrame({"text": ["a"], "label": ["b"]}), liveness=0.1)
    code = main(["audit", "--empirical", str(ledger), "--signing-key", str(key),
                 "--model", str(tiny_model_dir), "--dataset", str(toy_dataset_file),
                 "--silos", "1", "--canaries", "200", "--audit-steps", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "epsilon lower bound" in out and "appended as seq 1" in out
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    audit = entries[-1]
    assert audit["type"] == "audit" and audit["noise_multiplier"] == 1.0
    assert audit["m"] == 200 and audit["sound"] is True
    assert audit["eps_lower_bound"] < audit["eps_accounted"]
    assert verify_ledger(ledger) == []
    assert main(["audit", str(ledger)]) == 0
    assert "empirical audit seq 1" in capsys.readouterr().out

    audit["v"] = audit["r"]  # claim every guess was right: the bound no longer matches
    ledger.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    problems = verify_ledger(ledger)
    assert any(p.endswith("seq 1: entry_hash: hash mismatch (content changed after signing)")
               for p in problems)
    assert any("seq 1: eps_lower_bound: stored" in p for p in problems)
    assert np.isfinite(audit["eps_accounted"])
