"""FedPipe on a heterogeneous profile mix against one uniform configuration for all.

Runs the default federation (embedded model and data, 4 non-IID silos, FLoRA, DP at
epsilon 8) twice with the same seed, the same DP noise seed (``--dp-noise-seed``) and the
``hospital-mix`` profiles:

- ``per-silo``: each silo gets the configurator's optimum for its own profile;
- ``uniform``: every silo gets the one configuration that fits the weakest profile
  (the element-wise minimum of the mix).

Per run it records the plan, the held-out accuracy after every round, and per silo the
measured peak memory of its training rounds (peak RSS above the start, `PeakRSS`) against
its memory limit. Writes ``benchmarks/results/fedpipe.json`` (a header row, then one row
per run and silo).

    .venv/bin/python benchmarks/fedpipe.py [--rounds 3] [--profiles hospital-mix]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from silotune.config import RunConfig


def run(mode: str, args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "silotune.cli", "simulate", "--profiles", args.profiles,
           "--plan-mode", mode, "--rounds", str(args.rounds), "--seed", str(args.seed),
           "--local-steps", str(args.local_steps), "--dp-noise-seed", str(args.dp_noise_seed),
           "--test-size", str(args.test_size), "--out", str(out)]
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    seconds = round(time.monotonic() - start, 1)
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    accuracy = [r["accuracy"] for r in rounds]
    rows: list[dict[str, Any]] = [{
        "plan_mode": mode, "silo": "all", "accuracy": accuracy[-1],
        "accuracy_per_round": accuracy, "base_accuracy": metrics["base_accuracy"],
        "bytes_up": sum(r["bytes_up"] for r in rounds), "seconds": seconds,
        "excluded": sum(len(r["excluded"]) for r in rounds),
        "importance": metrics["plan"]["importance"]}]
    for silo, plan in metrics["plan"]["silos"].items():
        peaks = [r["peak_memory_bytes"][silo] for r in rounds
                 if silo in r.get("peak_memory_bytes", {})]
        peak = max(peaks) if peaks else None
        rows.append({"plan_mode": mode, "silo": silo, **plan,
                     "targets": ",".join(plan["targets"]),
                     "peak_memory_bytes": peak,
                     "within_memory_limit": peak is not None
                     and peak <= plan["memory_limit_bytes"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profiles", default="hospital-mix")
    parser.add_argument("--seed", type=int, default=RunConfig().seed)
    parser.add_argument("--dp-noise-seed", type=int, default=0,
                        help="same DP noise streams in both runs (-1: OS noise)")
    parser.add_argument("--local-steps", type=int, default=RunConfig().local_steps)
    parser.add_argument("--test-size", type=int, default=RunConfig().test_size)
    parser.add_argument("--modes", nargs="+", default=["per-silo", "uniform"])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "fedpipe.json")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = [{
        "header": True, "machine": platform.machine(), "python": platform.python_version(),
        "profiles": args.profiles, "rounds": args.rounds, "seed": args.seed,
        "dp_noise_seed": args.dp_noise_seed,
        "local_steps": args.local_steps,
        "test_size": args.test_size,
        "peak_memory": "peak RSS of each training round above its start (silotune.ml.memory)"}]
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            rows += run(mode, args, Path(tmp) / mode)
            print(json.dumps(rows[-1]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1) + "\n")  # partial results too
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
