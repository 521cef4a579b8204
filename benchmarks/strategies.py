"""Compare the aggregation rules on one federation, plus centralised and local-only rows.

Every rule runs the same federation (`silotune simulate` defaults unless overridden: the
embedded model and data, non-IID silos, heterogeneous ranks, DP at epsilon 8, same seed
and the same DP noise seed);
fedit and fedsa need one rank, so they run with every silo at the largest rank. Reference
rows: "centralised" trains one LoRA on all silos' data pooled, without DP, for the same
number of steps as one silo trains in the whole run; "local-only" trains each silo alone
(DP, same budget and steps) and reports the mean held-out accuracy.

Writes ``benchmarks/results/strategies.json`` (a header row, then one row per rule:
``{"strategy", "accuracy", "loss", "base_accuracy", "bytes_up", "bytes_down", "seconds"}``).

    .venv/bin/python benchmarks/strategies.py [--rounds 4] [--model PATH --dataset PATH]
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

import numpy as np
import pandas as pd

from silotune import strategies
from silotune.adapters.types import LowRankUpdate, modules_from_peft
from silotune.client.silo import SiloPrivacy, SiloPrivacyConfig
from silotune.config import RunConfig
from silotune.ml.assets import resolve_model
from silotune.ml.dp_sgd import DPConfig, sample_rate_for
from silotune.ml.lm import encode, evaluate, load_model
from silotune.ml.merge import apply_update
from silotune.ml.targets import resolve_targets
from silotune.ml.train import LocalTrainConfig, train_local
from silotune.simulations.federation import federated_task

EQUAL_RANK_RULES = {"fedit", "fedsa"}


def run_rule(name: str, cfg: RunConfig, out: Path) -> dict[str, object]:
    ranks = cfg.lora_ranks if name not in EQUAL_RANK_RULES else (max(cfg.lora_ranks),)
    args = ["--strategy", name, "--model", cfg.model, "--dataset", cfg.dataset,
            "--rounds", str(cfg.rounds), "--silos", str(cfg.num_silos),
            "--local-steps", str(cfg.local_steps), "--test-size", str(cfg.test_size),
            "--epsilon", str(cfg.target_epsilon), "--seed", str(cfg.seed),
            "--dp-noise-seed", str(cfg.dp_noise_seed),
            "--ranks", ",".join(map(str, ranks)), "--out", str(out)]
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "silotune.cli", "simulate", *args], check=True)
    metrics = json.loads((out / "metrics.json").read_text())
    last = metrics["rounds"][-1]
    return {"strategy": name, "accuracy": last["accuracy"], "loss": last["loss"],
            "base_accuracy": metrics["base_accuracy"],
            "bytes_up": sum(r["bytes_up"] for r in metrics["rounds"]),
            "bytes_down": sum(r["bytes_down"] for r in metrics["rounds"]),
            "seconds": round(time.monotonic() - start, 1)}


def train_alone(cfg: RunConfig, frame: pd.DataFrame, dp: bool, out: Path) -> float:
    """Held-out accuracy of one LoRA trained on `frame` for the run's per-silo steps."""
    model, tok = load_model(resolve_model(cfg.model))
    task = federated_task(cfg)
    examples = [encode(tok, t, lab) for t, lab in zip(frame["text"], frame["label"],
                                                          strict=True)]
    steps = cfg.rounds * cfg.local_steps
    local = LocalTrainConfig(rank=max(cfg.lora_ranks), alpha=cfg.lora_alpha_per_rank
                             * max(cfg.lora_ranks),
                             targets=resolve_targets(model, cfg.lora_targets),
                             local_steps=steps, batch_size=cfg.batch_size,
                             physical_batch_size=cfg.physical_batch_size,
                             learning_rate=cfg.learning_rate, init_seed=cfg.seed)
    privacy = None
    if dp and cfg.private:
        silo = SiloPrivacy(SiloPrivacyConfig("alone", cfg.target_epsilon, cfg.target_delta,
                                             cfg.max_grad_norm, out / "ledger.jsonl",
                                             out / "key.pem"))
        sigma = silo.noise_multiplier("alone", sample_rate_for(len(examples),
                                                               cfg.batch_size), steps)
        privacy = DPConfig(noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm)
    result = train_local(model, examples, int(tok.pad_token_id), local, privacy)
    update = LowRankUpdate(modules_from_peft(result.adapter), scale=cfg.lora_alpha_per_rank)
    apply_update(model, update)
    return evaluate(model, tok, list(task.test["text"]), list(task.test["label"]),
                    task.labels, cfg.eval_batch_size).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=RunConfig().rounds)
    parser.add_argument("--model", default=RunConfig().model)
    parser.add_argument("--dataset", default=RunConfig().dataset)
    parser.add_argument("--test-size", type=int, default=RunConfig().test_size)
    parser.add_argument("--rules", nargs="+", default=strategies.available())
    parser.add_argument("--dp-noise-seed", type=int, default=0,
                        help="every rule's silos draw the same DP noise streams (-1: OS)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "strategies.json")
    args = parser.parse_args()
    cfg = RunConfig(rounds=args.rounds, model=args.model, dataset=args.dataset,
                    test_size=args.test_size, dp_noise_seed=args.dp_noise_seed)
    rows: list[dict[str, object]] = [{
        "header": True, "machine": platform.machine(), "python": platform.python_version(),
        "config": cfg.to_json_dict()}]
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def add(row: dict[str, object]) -> None:  # written as it goes: a long run keeps its rows
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps(rows, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rules:
            add(run_rule(name, cfg, Path(tmp) / name))
        task = federated_task(cfg)
        frames = [task.silo_frame(i) for i in range(task.num_silos)]
        pooled = pd.concat(frames, ignore_index=True)
        start = time.monotonic()
        add({"strategy": "centralised (no DP)",
             "accuracy": train_alone(cfg, pooled, dp=False, out=Path(tmp)),
             "seconds": round(time.monotonic() - start, 1)})
        start = time.monotonic()
        alone = [train_alone(cfg, frame, dp=True, out=Path(tmp) / f"alone-{i}")
                 for i, frame in enumerate(frames)]
        add({"strategy": "local-only (mean over silos)", "accuracy": float(np.mean(alone)),
             "per_silo": alone, "seconds": round(time.monotonic() - start, 1)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
