"""CrossLM: the run, its private-only SLM baseline, and the feedback ablation.

Three ``silotune simulate --mode crosslm`` runs of the same federation (same seed, same
silos, same DP budget and SLM schedule):

* ``feedback``: the LLM update is weighted by the silos' aggregated SLM feedback;
* ``uniform``: the ablation, every synthetic example weighted 1 in the LLM update (the
  SLMs still train on the feedback-filtered set, so only the LLM side differs);
* ``private-only``: ``--per-label 0``, no synthetic data: SLMs trained on private data
  alone for the same budget and the same number of DP-SGD steps (the baseline).

Writes ``benchmarks/results/crosslm.json``: a header row, then one row per run with the
base and final LLM task accuracy and general-text perplexity, the SLM accuracy (round 0
and final, mean and per silo), the synthetic set sizes and mean scores, the final epsilon
per silo and the wall time. Extra flags go to every run, e.g.::

    .venv/bin/python benchmarks/crosslm.py --rounds 2 -- --per-label 6 --llm-steps 10
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RUNS: dict[str, list[str]] = {
    "feedback": ["--weighting", "feedback"],
    "private-only": ["--per-label", "0"],
    "uniform": ["--weighting", "uniform"],
}


def run(name: str, common: list[str], out: Path) -> dict[str, Any]:
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "silotune.cli", "simulate", "--mode", "crosslm",
                    *common, *RUNS[name], "--out", str(out)], check=True)
    m = json.loads((out / "metrics.json").read_text())
    first, last = m["rounds"][0], m["rounds"][-1]
    synthetic = [r for r in m["rounds"] if "synthetic_size" in r]
    return {
        "run": name, "base_llm_accuracy": m["base_accuracy"],
        "llm_accuracy": last["accuracy"],
        "llm_accuracy_per_round": [r["accuracy"] for r in m["rounds"]],
        "base_perplexity": m["base_perplexity"], "perplexity": last["perplexity"],
        "perplexity_rise": last["perplexity"] / m["base_perplexity"] - 1.0,
        "slm_accuracy_round0": first["slm_accuracy_mean"],
        "slm_accuracy": last["slm_accuracy_mean"],
        "slm_accuracy_per_round": [r["slm_accuracy_mean"] for r in m["rounds"]],
        "slm_accuracy_per_silo": last["slm_accuracy"],
        "synthetic_size": [r["synthetic_size"] for r in synthetic],
        "synthetic_kept": [r["synthetic_kept"] for r in synthetic],
        "mean_score": [r["mean_score"] for r in synthetic],
        "epsilon": last["epsilon"], "seconds": round(time.monotonic() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "crosslm.json")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/crosslm-benchmark"),
                        help="where each run's folder (metrics, synthetic.jsonl, ledgers) "
                        "is kept (%(default)s)")
    parser.add_argument("extra", nargs="*", help="flags passed to every run (after --)")
    args = parser.parse_args()
    common = ["--rounds", str(args.rounds), *args.extra]
    rows: list[dict[str, Any]] = [{
        "header": True, "machine": platform.machine(), "python": platform.python_version(),
        "command": "silotune simulate --mode crosslm " + " ".join(common)}]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.runs:
        out = args.runs_dir / name
        if out.exists():
            shutil.rmtree(out)  # a fresh run: fresh ledgers, fresh SLMs
        rows.append(run(name, common, out))
        print(json.dumps(rows[-1]), flush=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")  # partial results survive
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
