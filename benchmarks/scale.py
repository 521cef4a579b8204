"""Seconds per round and peak memory as the federation grows, sampled silos fixed.

Runs ``silotune simulate`` (the Flower Simulation Engine, Ray backend) on a tiny random
Llama (built as tests/conftest.py builds it) and a generated 3-label toy task, with 10,
100, 1000 and 10000 silos of the same size (``--rows-per-silo``) and the same number
sampled per round (``--sampled``, i.e. ``--fraction sampled/silos``). Each size runs in
a fresh process. Writes ``benchmarks/results/scale.json``: a header row (machine,
versions, settings), then rows
``{"silos", "sampled", "seconds_per_round", "first_round_seconds", "peak_mem_mb",
"workers_peak_mem_mb", "startup_seconds"}``:

- ``seconds_per_round``: mean of the rounds after the first (the first also starts the
  Ray actors and loads the model in them; it is ``first_round_seconds``);
- ``peak_mem_mb``: peak RSS of the simulate process (ServerApp and the engine that holds
  the silos' Flower contexts);
- ``workers_peak_mem_mb``: peak of the summed RSS of its child processes (Ray's GCS,
  raylet and the ClientApp actors that hold the base model), sampled every 0.25 s.

    .venv/bin/python benchmarks/scale.py [--silos 10 100 1000 10000] [--sampled 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.json"


def _children_rss_mb() -> float:
    import psutil

    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One federation size in this process; returns its row."""
    sys.path.insert(0, str(ROOT))
    from silotune.config import RunConfig
    from silotune.simulations.launcher import simulate
    from tests.conftest import build_tiny_model, toy_frame

    work = Path(tempfile.mkdtemp(prefix="silotune-scale-"))
    model = build_tiny_model(work / "model")
    data = work / "toy.jsonl"
    toy_frame(args.one * args.rows_per_silo + args.test_size, seed=1).to_json(
        data, orient="records", lines=True)
    cfg = RunConfig(model=str(model), dataset=str(data), num_silos=args.one,
                    rounds=args.rounds, fraction_train=args.sampled / args.one,
                    min_replies=1, local_steps=2, batch_size=2, physical_batch_size=2,
                    lora_ranks=(4,), target_epsilon=args.epsilon, partition="iid",
                    test_size=args.test_size, eval_batch_size=16, seed=0,
                    out_dir=str(work / "run"))
    peak_workers = 0.0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak_workers
        while not done.wait(0.25):
            peak_workers = max(peak_workers, _children_rss_mb())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    metrics = simulate(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    total = time.monotonic() - start
    done.set()
    watcher.join()
    seconds = [r["seconds"] for r in metrics["rounds"]]
    sampled = {len(r["participants"]) + len(r["excluded"]) for r in metrics["rounds"]}
    later = seconds[1:] or seconds
    return {"silos": args.one, "sampled": max(sampled),
            "seconds_per_round": round(sum(later) / len(later), 3),
            "first_round_seconds": round(seconds[0], 3),
            "peak_mem_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "workers_peak_mem_mb": round(peak_workers, 1),
            "startup_seconds": round(total - sum(seconds), 1)}


def header(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    return {"header": True, "machine": platform.machine(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "flwr": version("flwr"), "ray": version("ray"),
            "torch": version("torch"), "model": "tiny random Llama (2 layers, hidden 32)",
            "rounds": args.rounds, "rows_per_silo": args.rows_per_silo,
            "partition": "iid", "epsilon": str(args.epsilon), "local_steps": 2,
            "note": "seconds_per_round: mean of rounds 2..N; shared 2-core machine"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--silos", type=int, nargs="+", default=[10, 100, 1000, 10000])
    p.add_argument("--sampled", type=int, default=10, help="silos sampled per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rows-per-silo", type=int, default=4)
    p.add_argument("--test-size", type=int, default=30)
    p.add_argument("--epsilon", type=float, default=float("inf"),
                   help="per-silo budget; inf (default) = non-private")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size
    p.add_argument("--row-file", type=Path, help=argparse.SUPPRESS)  # internal: its row
    args = p.parse_args()
    if args.one is not None:
        args.row_file.write_text(json.dumps(run_one(args)))
        return
    rows: list[dict[str, Any]] = [header(args)]
    for silos in args.silos:
        cmd = [sys.executable, __file__, "--one", str(silos), "--sampled", str(args.sampled),
               "--rounds", str(args.rounds), "--rows-per-silo", str(args.rows_per_silo),
               "--test-size", str(args.test_size), "--epsilon", str(args.epsilon)]
        with tempfile.TemporaryDirectory() as tmp:
            row_file = Path(tmp) / "row.json"
            proc = subprocess.run([*cmd, "--row-file", str(row_file)], capture_output=True,
                                  text=True, cwd=ROOT)
            if proc.returncode != 0 or not row_file.exists():
                sys.exit(f"{silos} silos failed:\n{proc.stderr[-5000:]}")
            row = json.loads(row_file.read_text())
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
