"""Empirical one-run audit (Dirac gradient canaries) on a silo's real training pipeline.

For each control (noise off, DP on at the given sigma, canaries never inserted), trains
silo ``--silo-index`` of the default federation split once with ``--canaries`` canaries
and records the 95% lower bound, the accounted epsilon of the same run, AUC and timing.
Writes ``benchmarks/results/privacy_audit.json``: a header row (machine, versions), then
one row per (model, control).

    .venv/bin/python benchmarks/privacy_audit.py [--model smollm2-135m-instruct]
        [--sigma 1.0] [--canaries 1000] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import opacus
import torch

from silotune.config import RunConfig
from silotune.ml.assets import resolve_model
from silotune.ml.dp_sgd import DPConfig
from silotune.ml.lm import encode, load_model
from silotune.ml.targets import resolve_targets
from silotune.ml.train import LocalTrainConfig
from silotune.privacy.canary_audit import empirical_audit
from silotune.simulations.federation import federated_task

CONTROLS = (("noise off", 0.0, True), ("DP on", None, True), ("never inserted", 0.0, False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=RunConfig().model)
    p.add_argument("--dataset", default=RunConfig().dataset)
    p.add_argument("--silo-index", type=int, default=0)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy_audit.json"))
    args = p.parse_args()

    run = RunConfig(model=args.model, dataset=args.dataset)
    frame = federated_task(run).silo_frame(args.silo_index)
    model, tok = load_model(resolve_model(run.model))
    examples = [encode(tok, t, lab) for t, lab in zip(frame["text"], frame["label"],
                                                          strict=True)]
    rank = run.rank_of(args.silo_index)
    cfg = LocalTrainConfig(rank=rank, alpha=run.lora_alpha_per_rank * rank,
                           targets=resolve_targets(model, run.lora_targets),
                           local_steps=args.steps,
                           batch_size=run.batch_size, physical_batch_size=run.batch_size,
                           learning_rate=run.learning_rate, init_seed=run.seed)
    rows: list[dict[str, object]] = [{
        "machine": platform.machine(), "cpus": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "opacus": opacus.__version__, "model": args.model, "dataset": args.dataset,
        "silos": run.num_silos, "silo_index": args.silo_index,
        "silo_examples": len(examples), "rank": rank, "batch_size": run.batch_size,
        "steps": args.steps, "canaries": args.canaries, "sigma": args.sigma,
        "max_grad_norm": run.max_grad_norm, "delta": run.target_delta}]
    for name, sigma, insert in CONTROLS:
        start = time.monotonic()
        audit = empirical_audit(model, examples, int(tok.pad_token_id), cfg,
                                DPConfig(args.sigma if sigma is None else sigma,
                                         run.max_grad_norm),
                                canaries=args.canaries, delta=run.target_delta,
                                insert=insert)
        row = {"model": args.model, "control": name, "noise_multiplier": audit.noise_multiplier,
               "sample_rate": audit.sample_rate, "eps_lower_bound": audit.result.eps_lower_bound,
               "eps_accounted": audit.eps_accounted, "auc": audit.result.auc,
               "r": audit.result.r, "v": audit.result.v,
               "inserted_canaries": audit.inserted_canaries,
               "seconds": round(time.monotonic() - start, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
