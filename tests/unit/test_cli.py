"""Bad input gets a clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import pytest

from silotune.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_help_lists_the_jobs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for job in ("simulate", "coordinator", "run", "agent", "audit", "certs", "report"):
        assert job in out


def test_unknown_strategy(capsys, tmp_path):
    code, text = _run(capsys, "simulate", "--strategy", "nope", "--out", str(tmp_path))
    assert code == 2 and "unknown strategy 'nope'" in text and "flora" in text


def test_unknown_model_name(capsys, tmp_path):
    code, text = _run(capsys, "simulate", "--model", "gpt-17", "--out", str(tmp_path))
    assert code == 2 and "gpt-17" in text and "smollm2-135m-instruct" in text


def test_missing_dataset_file(capsys, tiny_model_dir, tmp_path):
    code, text = _run(capsys, "simulate", "--model", str(tiny_model_dir), "--dataset",
                      str(tmp_path / "nothing.jsonl"), "--out", str(tmp_path))
    assert code == 2 and "dataset file not found" in text


def test_dataset_without_label_column(capsys, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,category\nhello,a\nworld,b\n")
    code, text = _run(capsys, "simulate", "--model", str(tiny_model_dir), "--dataset",
                      str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and "text" in text and "--text-column" in text


@pytest.mark.parametrize("eps", ["0", "-1", "nan", "lots"])
def test_bad_epsilon(capsys, eps):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--epsilon", eps])
    assert exit_info.value.code == 2
    assert "epsilon" in capsys.readouterr().err


def test_out_of_range_flag_names_the_key(capsys, tmp_path):
    code, text = _run(capsys, "simulate", "--rounds", "0", "--out", str(tmp_path))
    assert code == 2 and "rounds" in text


def test_coordinator_without_certificates_refuses(capsys, tmp_path):
    code, text = _run(capsys, "coordinator", "--state-dir", str(tmp_path / "state"))
    assert code == 2 and "--insecure" in text and "silotune certs" in text
    assert not (tmp_path / "state").exists()  # refused before creating anything


def test_audit_missing_ledger(capsys, tmp_path):
    code, text = _run(capsys, "audit", str(tmp_path / "none.jsonl"))
    assert code == 1 and "not found" in text


def test_plan_prints_each_silo_and_its_binding_constraint(capsys, tiny_model_dir,
                                                          toy_dataset_file):
    code, text = _run(capsys, "plan", "--profiles", "hospital-mix", "--silos", "3",
                      "--model", str(tiny_model_dir), "--dataset", str(toy_dataset_file))
    assert code == 0, text
    for expected in ("silo-000", "research-hospital", "silo-002", "clinic-laptop",
                     "binding", "importance (share)"):
        assert expected in text


def test_plan_of_an_infeasible_profile_names_the_constraint(capsys, monkeypatch,
                                                            tiny_model_dir,
                                                            toy_dataset_file):
    from silotune.planning import profiles

    tiny = profiles.SiloProfile("tiny-box", memory_gb=1e-4, gflops=1.0, upload_mbps=1.0,
                                download_mbps=1.0, round_seconds=600.0)
    monkeypatch.setitem(profiles.MIXES, "tiny-boxes", (tiny,))
    code, text = _run(capsys, "plan", "--profiles", "tiny-boxes", "--silos", "2",
                      "--model", str(tiny_model_dir), "--dataset", str(toy_dataset_file))
    assert code == 2
    assert "no configuration fits" in text and "memory-gb" in text and "Traceback" not in text


def test_unknown_profile_mix(capsys, tmp_path):
    code, text = _run(capsys, "simulate", "--profiles", "mansions", "--out", str(tmp_path))
    assert code == 2 and "profiles" in text and "hospital-mix" in text


def test_simulate_refuses_an_infeasible_mix_before_starting(capsys, monkeypatch,
                                                            tiny_model_dir,
                                                            toy_dataset_file, tmp_path):
    from silotune.planning import profiles

    slow = profiles.SiloProfile("slow-box", memory_gb=8.0, gflops=1e-6, upload_mbps=1.0,
                                download_mbps=1.0, round_seconds=1.0)
    monkeypatch.setitem(profiles.MIXES, "slow-boxes", (slow,))
    code, text = _run(capsys, "simulate", "--profiles", "slow-boxes", "--silos", "2",
                      "--model", str(tiny_model_dir), "--dataset", str(toy_dataset_file),
                      "--out", str(tmp_path / "run"))
    assert code == 2 and "time" in text and "round-seconds" in text
    assert not (tmp_path / "run" / "metrics.json").exists()


def _old_simulation(out):
    """An OUT folder left by an earlier simulation: a ledger, silo state, a checkpoint."""
    (out / "ledgers").mkdir(parents=True)
    (out / "ledgers" / "silo-000.jsonl").write_text('{"seq": 0}\n')
    (out / "silos" / "silo-000").mkdir(parents=True)
    (out / "silos" / "silo-000" / "ledger-signing-key.pem").write_text("key")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / "state.json").write_text("{}")
    return out


@pytest.fixture
def simulate_calls(monkeypatch):
    """Replace the simulation by a stub that records its configs."""
    from silotune.simulations import launcher

    calls = []

    def stub(cfg, progress=print, ray_address=None):
        calls.append(cfg)
        return {"private": True, "rounds": []}

    monkeypatch.setattr(launcher, "simulate", stub)
    monkeypatch.setattr("silotune.server.report.format_summary_table", lambda m: "table")
    return calls


def test_simulate_refuses_an_out_holding_old_ledgers(capsys, tmp_path, simulate_calls):
    out = _old_simulation(tmp_path / "run")
    code, text = _run(capsys, "simulate", "--out", str(out))
    assert code == 2 and not simulate_calls
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert str(out) in text and "--resume" in text and "--new-budget" in text
    assert (out / "ledgers" / "silo-000.jsonl").exists()  # nothing moved


def test_simulate_resume_continues_the_old_silos(capsys, tmp_path, simulate_calls):
    out = _old_simulation(tmp_path / "run")
    code, text = _run(capsys, "simulate", "--out", str(out), "--resume")
    assert code == 0, text
    assert [c.resume for c in simulate_calls] == [True]
    assert (out / "ledgers" / "silo-000.jsonl").exists()
    assert not list(out.glob("previous-*"))


def test_simulate_resume_without_a_checkpoint_refuses(capsys, tmp_path, simulate_calls):
    out = _old_simulation(tmp_path / "run")
    (out / "checkpoint" / "state.json").unlink()
    code, text = _run(capsys, "simulate", "--out", str(out), "--resume")
    assert code == 2 and not simulate_calls and "--new-budget" in text


def test_simulate_new_budget_moves_the_old_silos_aside(capsys, tmp_path, simulate_calls):
    out = _old_simulation(tmp_path / "run")
    code, text = _run(capsys, "simulate", "--out", str(out), "--new-budget")
    assert code == 0, text
    assert [c.resume for c in simulate_calls] == [False]
    (previous,) = out.glob("previous-*")
    assert (previous / "ledgers" / "silo-000.jsonl").read_text() == '{"seq": 0}\n'
    assert (previous / "silos" / "silo-000" / "ledger-signing-key.pem").exists()
    assert (previous / "checkpoint" / "state.json").exists()
    assert not (out / "ledgers").exists() and not (out / "silos").exists()
    assert str(previous) in text and "fresh" in text


def test_simulate_resume_and_new_budget_exclude_each_other(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--out", str(tmp_path), "--resume", "--new-budget"])
    assert exit_info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_simulate_into_a_fresh_out_needs_no_flag(capsys, tmp_path, simulate_calls):
    (tmp_path / "run" / "ledgers").mkdir(parents=True)  # empty: nothing was spent
    code, text = _run(capsys, "simulate", "--out", str(tmp_path / "run"))
    assert code == 0, text
    assert len(simulate_calls) == 1
