"""Bad input gets a clear message and a non-zero exit, never a traceback; every setting
has one name in flags, --config files and Flower's run config."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from silotune.cli import build_parser, main
from silotune.cli_flags import FIELDS, read_config_file, run_config
from silotune.config import RunConfig, flower_key

ROOT = Path(__file__).resolve().parents[2]


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
    assert code == 2 and "--strategy 'nope' is unknown" in text and "flora" in text


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
    code, text = _run(capsys, "simulate", "--epsilon", eps)
    assert code == 2
    assert text.startswith("silotune simulate: error: --epsilon")
    assert "out of range; allowed: > 0" in text or f"cannot read '{eps}'" in text


def test_out_of_range_flag_names_the_flag_given(capsys, tmp_path):
    code, text = _run(capsys, "simulate", "--rounds", "0", "--out", str(tmp_path))
    assert code == 2 and "--rounds 0 is out of range; allowed: >= 1" in text
    code, text = _run(capsys, "simulate", "--num-server-rounds=0", "--out", str(tmp_path))
    assert code == 2 and "--num-server-rounds 0 is out of range" in text


def test_a_rule_between_two_settings_names_both_flags(capsys, tmp_path):
    code, text = _run(capsys, "simulate", "--strategy", "fedit", "--client-dp-noise", "1",
                      "--out", str(tmp_path))
    assert code == 2 and "--strategy" in text and "--client-dp-noise > 0" in text
    assert "client_dp_noise" not in text


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
    assert code == 2 and "--profiles 'mansions' is unknown" in text and "hospital-mix" in text


def test_plan_needs_profiles(capsys, tiny_model_dir, toy_dataset_file):
    code, text = _run(capsys, "plan", "--model", str(tiny_model_dir), "--dataset",
                      str(toy_dataset_file))
    assert code == 2 and "--profiles is required" in text


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
def tiny_run(tiny_model_dir, toy_dataset_file):
    """Flags of a simulation that passes the input checks in a second."""
    return ("--model", str(tiny_model_dir), "--dataset", str(toy_dataset_file),
            "--test-size", "30")


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


def test_simulate_refuses_an_out_holding_old_ledgers(capsys, tmp_path, simulate_calls, tiny_run):
    out = _old_simulation(tmp_path / "run")
    code, text = _run(capsys, "simulate", *tiny_run, "--out", str(out))
    assert code == 2 and not simulate_calls
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert str(out) in text and "--resume" in text and "--new-budget" in text
    assert (out / "ledgers" / "silo-000.jsonl").exists()  # nothing moved


def test_simulate_resume_continues_the_old_silos(capsys, tmp_path, simulate_calls, tiny_run):
    out = _old_simulation(tmp_path / "run")
    code, text = _run(capsys, "simulate", *tiny_run, "--out", str(out), "--resume")
    assert code == 0, text
    assert [c.resume for c in simulate_calls] == [True]
    assert (out / "ledgers" / "silo-000.jsonl").exists()
    assert not list(out.glob("previous-*"))


def test_simulate_resume_without_a_checkpoint_refuses(capsys, tmp_path, simulate_calls, tiny_run):
    out = _old_simulation(tmp_path / "run")
    (out / "checkpoint" / "state.json").unlink()
    code, text = _run(capsys, "simulate", *tiny_run, "--out", str(out), "--resume")
    assert code == 2 and not simulate_calls and "--new-budget" in text


def test_simulate_new_budget_moves_the_old_silos_aside(capsys, tmp_path, simulate_calls, tiny_run):
    out = _old_simulation(tmp_path / "run")
    code, text = _run(capsys, "simulate", *tiny_run, "--out", str(out), "--new-budget")
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


def test_simulate_into_a_fresh_out_needs_no_flag(capsys, tmp_path, simulate_calls, tiny_run):
    (tmp_path / "run" / "ledgers").mkdir(parents=True)  # empty: nothing was spent
    code, text = _run(capsys, "simulate", *tiny_run, "--out", str(tmp_path / "run"))
    assert code == 0, text
    assert len(simulate_calls) == 1


def _simulate_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["simulate"]


def test_one_vocabulary_for_flags_config_files_and_flower():
    """pyproject's [tool.flwr.app.config] keys, RunConfig.to_flower, the simulate flags and
    the --config loader name the same settings; a setting missing from one fails here."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flower = pyproject["tool"]["flwr"]["app"]["config"]
    keys = set(flower)
    assert keys == set(RunConfig().to_flower())
    assert keys == {flower_key(name) for name in FIELDS}
    simulate = _simulate_parser()
    flags = {o for a in simulate._actions for o in a.option_strings}
    assert {f"--{k}" for k in keys} <= flags, keys - {f.lstrip("-") for f in flags}
    for name in FIELDS:  # each flag reaches its own field
        action = next(a for a in simulate._actions if f"--{flower_key(name)}" in a.option_strings)
        assert action.dest == name


def test_config_file_with_every_pyproject_key_gives_the_flower_run(tmp_path):
    source = (ROOT / "pyproject.toml").read_text()
    body = source.split("[tool.flwr.app.config]\n", 1)[1].split("\n\n", 1)[0]
    (tmp_path / "run.toml").write_text(body)
    args = _simulate_parser().parse_args(["--config", str(tmp_path / "run.toml")])
    cfg, _ = run_config(args, ["--config", str(tmp_path / "run.toml")])
    flower = tomllib.loads(source)["tool"]["flwr"]["app"]["config"]
    assert cfg == RunConfig.from_mapping(flower)
    assert set(read_config_file(tmp_path / "run.toml")) == set(FIELDS)


def test_flags_override_the_config_file_and_old_names_still_work(tmp_path):
    (tmp_path / "run.toml").write_text('num-silos = 3\nnum-server-rounds = 7\n'
                                       'lora-targets = "c_attn"\n')
    argv = ["--config", str(tmp_path / "run.toml"), "--rounds", "2", "--lr", "0.05",
            "--max-grad-norm", "0.5", "--physical-batch-size", "4", "--min-replies", "2",
            "--round-timeout", "60", "--lora-alpha-per-rank", "1"]
    cfg, _ = run_config(_simulate_parser().parse_args(argv), argv)
    assert (cfg.num_silos, cfg.rounds, cfg.learning_rate) == (3, 2, 0.05)
    assert cfg.lora_targets == ("c_attn",) and cfg.max_grad_norm == 0.5
    assert (cfg.physical_batch_size, cfg.min_replies, cfg.round_timeout) == (4, 2, 60.0)
    assert cfg.lora_alpha_per_rank == 1.0


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("silotune 0.")


def test_the_effective_config_is_printed_and_a_default_test_size_adjusted(
        capsys, tmp_path, simulate_calls, tiny_model_dir, toy_dataset_file):
    """The default test-size (330) is more than the 240-row toy set can hold out: the
    run uses, prints and records 120 instead (an explicit --test-size 330 is an error)."""
    code, text = _run(capsys, "simulate", "--model", str(tiny_model_dir), "--dataset",
                      str(toy_dataset_file), "--silos", "2", "--out", str(tmp_path / "r"))
    assert code == 0, text
    assert [c.test_size for c in simulate_calls] == [120]
    assert "[data] held-out size 120, not the default test-size 330" in text
    assert "[config] " in text and "num-silos=2" in text and "test-size=120" in text


def _silotune(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    entry = Path(sys.executable).with_name("silotune")  # the installed console script
    return subprocess.run([str(entry), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_bad_input_is_one_line_naming_the_flag(tmp_path, tiny_model_dir, toy_dataset_file):
    """Through the real entry point: exit status 2, one line on stderr naming the flag
    (or file key) to change, no traceback."""
    from tests.conftest import toy_frame

    six = tmp_path / "six.jsonl"
    toy_frame(6).to_json(six, orient="records", lines=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (tmp_path / "run.toml").write_text("num-silos = 2\nroundz = 3\n")
    data = ("--model", str(tiny_model_dir), "--dataset")
    cases = [
        (("simulate", "--silos", "0"), "--silos 0"),
        (("simulate", *data, str(six), "--silos", "10"), "--silos 10"),
        (("simulate", *data, str(toy_dataset_file), "--test-size", "330"),
         "--test-size 120 or less"),
        (("simulate", *data, str(empty)), "--dataset"),
        (("simulate", "--config", str(tmp_path / "run.toml")), "unknown key 'roundz'"),
        (("simulate", "--local-steps", "many"), "--local-steps: cannot read 'many'"),
        (("simulate", "--wire-dtype", "fp8"), "--wire-dtype"),
        (("report", str(tmp_path / "no-run")), "metrics.json not found"),
    ]
    for argv, expected in cases:
        proc = _silotune(*argv, "--out", str(tmp_path / "out"), cwd=tmp_path) \
            if argv[0] == "simulate" else _silotune(*argv, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (argv, proc.stderr)
        assert len(lines) == 1 and expected in lines[0], (argv, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout
    assert "empty" in _silotune("simulate", *data, str(empty), cwd=tmp_path).stderr


def test_lora_targets_auto_is_resolved_and_a_wrong_name_lists_the_modules(
        capsys, tmp_path, simulate_calls, tiny_run):
    code, text = _run(capsys, "simulate", *tiny_run, "--silos", "2", "--out",
                      str(tmp_path / "a"))
    assert code == 0, text
    assert [c.lora_targets for c in simulate_calls] == [("q_proj", "v_proj")]
    assert "lora-targets=q_proj,v_proj" in text  # named in the printed config
    code, text = _run(capsys, "simulate", *tiny_run, "--lora-targets", "c_attn", "--out",
                      str(tmp_path / "b"))
    assert code == 2 and len(simulate_calls) == 1
    assert "--lora-targets" in text and "named c_attn" in text
    assert "k_proj, lm_head, o_proj, q_proj" in text


def test_progress_lines_go_above_the_bar_never_onto_its_line(monkeypatch):
    """On a terminal (stdout and stderr on one screen) a run's line clears the bar's line
    first (a carriage return), then the bar is drawn again below it."""
    import io

    from tqdm import tqdm

    from silotune.cli import say

    screen = io.StringIO()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    with tqdm(total=3, desc="rounds", file=sys.stderr) as bar:
        bar.update(1)
        say("[round 1/3] accuracy 0.5")
        before, _, after = screen.getvalue().partition("[round 1/3] accuracy 0.5\n")
    assert "rounds" in before and before.endswith("\r")  # the bar's line was cleared
    assert "rounds" in after  # and redrawn under the line
