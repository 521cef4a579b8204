"""Measure the peak memory of a real DP-SGD round on the default model, per configuration.

Each configuration (targets, rank, micro-batch, base precision) runs in a fresh process:
it loads SmolLM2-135M-Instruct and the first silo's ICD-10 examples, resets the
process's peak-RSS mark (Linux ``/proc/self/clear_refs``), runs `train_local` with
DP-SGD (Opacus, 2 logical steps of twice the micro-batch, so every micro-batch is full)
and reads the peak (``VmHWM``). The measured figure is the peak RSS above the RSS just
before training: the silo's training working set (its private copy of the base at the
chosen precision, LoRA, optimiser, per-sample gradients, activations), which is what
`silotune.strategies.resources.memory_bytes` predicts.

Writes ``benchmarks/results/fedpipe_memory.json``: a header row, then one row per
configuration with the measured and predicted MB.

    .venv/bin/python benchmarks/fedpipe_memory.py            # the default grid
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

from silotune.assets import resolve_model
from silotune.client.train import DPConfig, LocalTrainConfig, train_local
from silotune.config import RunConfig
from silotune.importance import model_spec
from silotune.lm import encode, load_model
from silotune.memory import PeakRSS
from silotune.simulations.federation import federated_task
from silotune.strategies.resources import Choice, memory_bytes

MB = 2 ** 20
# (targets, rank, micro-batch, precision)
GRID: list[tuple[str, int, int, str]] = [
    ("q_proj,v_proj", 8, 32, "fp32"),
    ("q_proj,v_proj", 4, 16, "bf16"),
    ("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", 16, 8, "fp32"),
    ("q_proj,v_proj,o_proj,up_proj", 8, 32, "bf16"),
    ("q_proj,v_proj", 8, 16, "fp32"),
    ("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", 4, 32, "fp32"),
]


def measure_one(targets: tuple[str, ...], rank: int, batch: int, precision: str) -> dict:
    """Run one DP-SGD round in this process; return the measured peak above the start."""
    torch.set_num_threads(1)
    cfg = RunConfig()
    model, tok = load_model(resolve_model(cfg.model))
    frame = federated_task(cfg).silos[0]
    examples = [encode(tok, t, lab) for t, lab in zip(frame["text"], frame["label"],
                                                          strict=True)]
    seq_len = max(len(e.input_ids) for e in examples)
    local = LocalTrainConfig(rank=rank, alpha=2.0 * rank, targets=targets, local_steps=2,
                             batch_size=2 * batch, physical_batch_size=batch,
                             learning_rate=1e-2, init_seed=0, base_precision=precision)
    with PeakRSS() as peak:
        train_local(model, examples, int(tok.pad_token_id), local,
                    DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))
    if peak.bytes is None:
        raise RuntimeError("peak RSS is measurable only on Linux (/proc/self/status)")
    spec = model_spec(model)
    predicted = memory_bytes(spec, Choice(targets, rank, batch, precision), seq_len)
    return {"targets": ",".join(targets), "rank": rank, "batch": batch,
            "precision": precision, "seq_len": seq_len,
            "measured_mb": round(peak.bytes / MB, 1),
            "predicted_mb": round(predicted / MB, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "targets;rank;batch;precision"
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "fedpipe_memory.json")
    args = parser.parse_args()
    if args.one:
        targets, rank, batch, precision = args.one.split(";")
        print(json.dumps(measure_one(tuple(targets.split(",")), int(rank), int(batch),
                                     precision)))
        return
    rows: list[dict] = [{"header": True, "machine": platform.machine(),
                         "python": platform.python_version(), "torch": torch.__version__,
                         "model": RunConfig().model,
                         "measured": "peak RSS (VmHWM) above the RSS before train_local"}]
    for targets, rank, batch, precision in GRID:
        proc = subprocess.run([sys.executable, __file__, "--one",
                               f"{targets};{rank};{batch};{precision}"],
                              check=True, capture_output=True, text=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
