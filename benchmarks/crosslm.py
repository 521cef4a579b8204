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

``--replay RUN_DIR`` is the cheaper, tighter ablation: it repeats round 1's LLM update of
a finished (or interrupted) run from its saved ``synthetic.jsonl`` (the LLM before round
1 is the base model), once per weighting, with the run's seed and settings, so both arms
see the very same synthetic examples and the same aggregated feedback; it appends one row
per weighting (``{"run": "replay-<weighting>", "llm_accuracy", "perplexity", ...}``).
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


def replay(run_dir: Path, weighting: str) -> dict[str, Any]:
    """Round 1's LLM update of `run_dir` redone with `weighting`; held-out measures."""
    import numpy as np

    from silotune.config import RunConfig
    from silotune.ml.assets import general_text, resolve_model
    from silotune.ml.crosslm import example_weights
    from silotune.ml.lm import evaluate, load_model
    from silotune.ml.synthetic import (
        SUBJECTS,
        LLMUpdateConfig,
        SyntheticExample,
        perplexity,
        update_llm,
    )
    from silotune.server.crosslm import GENERAL_TEXTS
    from silotune.simulations.federation import federated_task

    start = time.monotonic()
    cfg = RunConfig.from_mapping({k.replace("_", "-"): v for k, v in json.loads(
        (run_dir / "config.json").read_text()).items()})
    rows = [json.loads(x) for x in (run_dir / "synthetic.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["round"] == 1]
    examples = [SyntheticExample(r["text"], r["label"]) for r in rows]
    feedback = np.array([r["score"] for r in rows])
    llm, tok = load_model(resolve_model(cfg.model))
    llm, loss = update_llm(llm, tok, examples, example_weights(feedback, weighting),
                           LLMUpdateConfig(steps=cfg.llm_steps,
                                           learning_rate=cfg.llm_learning_rate,
                                           seed=cfg.seed * 1009 + 1,
                                           subject=SUBJECTS.get(cfg.dataset, "text")))
    task = federated_task(cfg)
    res = evaluate(llm, tok, list(task.test["text"]), list(task.test["label"]),
                   task.labels, cfg.eval_batch_size)
    return {"run": f"replay-{weighting}", "source": str(run_dir), "round": 1,
            "synthetic_size": len(examples), "llm_train_loss": loss,
            "llm_accuracy": res.accuracy, "loss": res.loss,
            "perplexity": perplexity(llm, tok, general_text(GENERAL_TEXTS)),
            "seconds": round(time.monotonic() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "crosslm.json")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/crosslm-benchmark"),
                        help="where each run's folder (metrics, synthetic.jsonl, ledgers) "
                        "is kept (%(default)s)")
    parser.add_argument("--replay", type=Path, metavar="RUN_DIR",
                        help="redo round 1's LLM update of RUN_DIR per --weightings instead "
                        "of running simulations; rows are appended to --out")
    parser.add_argument("--weightings", nargs="+", default=["uniform", "feedback"],
                        choices=["uniform", "feedback"])
    parser.add_argument("extra", nargs="*", help="flags passed to every run (after --)")
    args = parser.parse_args()
    if args.replay is not None:
        rows = json.loads(args.out.read_text()) if args.out.exists() else [
            {"header": True, "machine": platform.machine(),
             "python": platform.python_version()}]
        for weighting in args.weightings:
            rows.append(replay(args.replay, weighting))
            print(json.dumps(rows[-1]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")
        return
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
