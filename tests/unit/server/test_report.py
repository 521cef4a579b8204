"""Tests for silotune.server.report: HTML report, plot PNGs and the terminal summary."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from silotune.server.report import (
    NON_PRIVATE_LABEL,
    PLOT_NAMES,
    format_summary_table,
    load_metrics,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG_TAG = '<img src="data:image/png;base64,'


def make_metrics(private: bool = True) -> dict[str, Any]:
    """Synthetic metrics.json: 3 rounds, 2 silos, one exclusion in round 2."""
    eps = [{"silo-a": 1.25, "silo-b": 1.5}, {"silo-a": 2.5, "silo-b": 3.0},
           {"silo-a": 3.75, "silo-b": 4.5}]
    limit = {"silo-a": 8.0, "silo-b": 6.0}
    rounds = []
    for i in range(3):
        rounds.append({
            "round": i + 1,
            "accuracy": [0.55, 0.625, 0.8125][i],
            "loss": [1.9, 1.6, 1.2][i],
            "epsilon": eps[i] if private else {},
            "epsilon_limit": dict(limit) if private else {},
            "bytes_up": 1000 * (i + 1),
            "bytes_down": 2000 * (i + 1),
            "seconds": 1.5 + i,
            "excluded": ([{"silo": "silo-b", "reason": "non-finite <lora_B> & norm > bound"}]
                         if i == 1 else []),
        })
    return {
        "config": {"strategy": "flora", "target_epsilon": 8.0 if private else "inf",
                   "target_delta": 1e-5, "model": "tiny <model>", "seed": 0},
        "private": private,
        "base_accuracy": 0.375,
        "base_loss": 2.25,
        "rounds": rounds,
    }


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return run_dir


def test_report_html_is_self_contained_with_four_embedded_pngs(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", make_metrics())
    out = write_report(run)
    assert out == run / "report.html"
    text = out.read_text(encoding="utf-8")
    assert text.count(IMG_TAG) == 4
    assert text.count("<img") == 4
    assert "http://" not in text and "https://" not in text
    assert "<a " not in text and "href" not in text
    assert "<link" not in text and "@import" not in text
    # one inline script (the render check), nothing loaded; CSP forbids any fetch
    assert text.count("<script") == 1 and "<script src" not in text
    assert "default-src 'none'" in text
    assert re.findall(r'src="(?!data:image/png;base64,)', text) == []
    # strings from the metrics are escaped
    assert "<lora_B>" not in text and "&lt;lora_B&gt;" in text
    assert "tiny &lt;model&gt;" in text
    assert "silo-b" in text
    assert "NON-PRIVATE" not in text


def test_plot_pngs_exist_and_are_valid(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", make_metrics())
    write_report(run)
    assert set(PLOT_NAMES) == {"accuracy", "epsilon", "bytes", "excluded"}
    for name in PLOT_NAMES:
        data = (run / "plots" / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 1000, name


def test_non_private_run_is_labelled(tmp_path: Path) -> None:
    metrics = make_metrics(private=False)
    run = write_metrics(tmp_path / "run", metrics)
    text = write_report(run).read_text(encoding="utf-8")
    assert "NON-PRIVATE" in text
    assert text.count(IMG_TAG) == 4
    assert (run / "plots" / "epsilon.png").read_bytes()[:8] == PNG_MAGIC
    summary = format_summary_table(metrics)
    assert NON_PRIVATE_LABEL in summary
    assert NON_PRIVATE_LABEL == "NON-PRIVATE (epsilon = inf)"


def test_summary_table_rows_and_values() -> None:
    summary = format_summary_table(make_metrics())
    lines = summary.splitlines()
    base = next(line for line in lines if line.startswith("base"))
    assert "0.375" in base and "2.25" in base
    last = next(line for line in lines if line.split()[:1] == ["3"])
    assert "0.8125" in last  # final accuracy
    assert "4.5" in last and "3.75" in last  # max / min epsilon over silos
    assert "3,000" in last and "6,000" in last  # bytes up / down
    assert last.split()[-1] == "0"  # excluded count in round 3
    round2 = next(line for line in lines if line.split()[:1] == ["2"])
    assert round2.split()[-1] == "1"
    assert any("silo-a" in line and "3.75" in line and "8" in line for line in lines)
    assert any("silo-b" in line and "4.5" in line and "6" in line for line in lines)
    assert "NON-PRIVATE" not in summary


def test_html_summary_contains_base_and_final_accuracy(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", make_metrics())
    text = write_report(run).read_text(encoding="utf-8")
    assert "0.375 (base) → 0.8125 (final)" in text
    assert "flora" in text


def test_missing_metrics_raises_value_error_naming_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"metrics\.json"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_invalid_metrics_raise_value_error(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics\.json"):
        write_report(tmp_path)
    bad = make_metrics()
    del bad["rounds"][0]["accuracy"]
    write_metrics(tmp_path, bad)
    with pytest.raises(ValueError, match=r"metrics\.json.*rounds\[0\]\.accuracy"):
        load_metrics(tmp_path)
    with pytest.raises(ValueError, match="config"):
        format_summary_table({"rounds": [], "base_accuracy": 0.5})


def test_noise_multiplier_per_silo_in_summary_and_html(tmp_path: Path) -> None:
    metrics = make_metrics()
    for row in metrics["rounds"]:  # silo-b trains from round 2 on (as loop.py records it)
        row["noise_multiplier"] = ({"silo-a": 0.875} if row["round"] == 1
                                   else {"silo-a": 0.875, "silo-b": 1.375})
    lines = format_summary_table(metrics).splitlines()
    assert any("noise multiplier" in line for line in lines)
    assert any("silo-a" in line and "noise multiplier 0.875" in line for line in lines)
    assert any("silo-b" in line and "noise multiplier 1.375" in line for line in lines)
    text = write_report(write_metrics(tmp_path / "run", metrics)).read_text(encoding="utf-8")
    assert "<th>noise multiplier</th>" in text
    assert '<td>silo-b</td><td class="n">4.5</td><td class="n">6</td><td class="n">1.375</td>' \
        in text
    # an older metrics file without the key still validates; the column shows "-"
    old = write_metrics(tmp_path / "old", make_metrics())
    assert all(r["noise_multiplier"] == {} for r in load_metrics(old)["rounds"])
    assert "noise multiplier 0" not in format_summary_table(make_metrics())
    assert "<td>silo-a</td><td class=\"n\">3.75</td><td class=\"n\">8</td><td>-</td>" \
        in write_report(old).read_text(encoding="utf-8")
    bad = make_metrics()
    bad["rounds"][0]["noise_multiplier"] = {"silo-a": "high"}
    with pytest.raises(ValueError, match=r"rounds\[0\]\.noise_multiplier"):
        format_summary_table(bad)
