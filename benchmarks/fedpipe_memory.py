"""Measure the peak memory of a real DP-SGD round on the default model, per configuration.

Each configuration (targets, rank, micro-batch, base precision) runs in a fresh process:
it loads SmolLM2-135M-Instruct and the first silo's ICD-10 examples, resets the
process's peak-RSS mark (Linux ``/proc/self/clear_refs``), runs `train_local` with
DP-SGD (Opacus, 2 logical steps of twice the micro-batch, so every micro-batch is full)
and reads the peak (``VmHWM``). The measured figure is the peak RSS above the RSS just
before training: the silo's training working set (its private copy of the base at the
chosen precision, LoRA, optimiser, per-sample gradients, activations), which is what
`silotune.planning.resources.memory_bytes` predicts.

Writes ``benchmarks/results/fedpipe_memory.json``: a header row (machine, versions and
the model's `ModelSpec`), then one row per configuration with the measured and
predicted MB and the relative error. The first three rows calibrate the model's
activation constants (`silotune.planning.resources`); the others check it.

    .venv/bin/python benchmarks/fedpipe_memory.py            # the default grid
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from silotune.config import RunConfig
from silotune.ml.assets import resolve_model
from silotune.ml.dp_sgd import DPConfig
from silotune.ml.lm import encode, load_model
from silotune.ml.memory import PeakRSS
from silotune.ml.train import LocalTrainConfig, train_local
from silotune.planning.resources import Choice, ModelSpec, memory_bytes
from silotune.planning.sensitivity import model_spec
from silotune.simulations.federation import federated_task

MB = 2 ** 20
# (targets, rank, micro-batch, precision)
GRID: list[tuple[str, int, int, str]] = [
    # batch 32: these calibrate the activation constants of the memory model
    ("q_proj,v_proj", 8, 32, "fp32"),
    ("q_proj,v_proj,o_proj,up_proj", 8, 32, "bf16"),
    ("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", 4, 32, "fp32"),
    # smaller batches: these check it
    ("q_proj,v_proj", 4, 16, "bf16"),
    ("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", 16, 8, "fp32"),
    ("q_proj,v_proj", 8, 16, "fp32"),
]


def measure_one(targets: tuple[str, ...], rank: int, batch: int, precision: str
                ) -> dict[str, Any]:
    """Run one DP-SGD round in this process; return the measured peak above the start."""
    torch.set_num_threads(1)
    cfg = RunConfig()
    model, tok = load_model(resolve_model(cfg.model))
    frame = federated_task(cfg).silo_frame(0)
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
    return {"targets": ",".join(targets), "rank": rank, "batch": batch,
            "precision": precision, "seq_len": seq_len,
            "measured_mb": round(peak.bytes / MB, 1)}


def spec_to_json(spec: ModelSpec) -> dict[str, Any]:
    return {**dataclasses.asdict(spec),
            "matrices": {t: [list(s) for s in v] for t, v in spec.matrices.items()}}


def spec_from_json(data: dict[str, Any]) -> ModelSpec:
    return ModelSpec(**{**data, "matrices": {t: tuple(tuple(s) for s in v)
                                             for t, v in data["matrices"].items()}})


def predicted_mb(spec: ModelSpec, row: dict[str, Any]) -> float:
    """The memory model's figure for a measured row."""
    choice = Choice(tuple(row["targets"].split(",")), row["rank"], row["batch"],
                    row["precision"])
    return round(memory_bytes(spec, choice, row["seq_len"]) / MB, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "targets;rank;batch;precision"
    parser.add_argument("--reuse", type=Path, metavar="JSON",
                        help="re-use the measurements of this results file and only "
                        "recompute the model's predictions (after changing the model)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "fedpipe_memory.json")
    args = parser.parse_args()
    if args.one:
        targets, rank, batch, precision = args.one.split(";")
        print(json.dumps(measure_one(tuple(targets.split(",")), int(rank), int(batch),
                                     precision)))
        return
    if args.reuse:
        old = json.loads(args.reuse.read_text())
        header, measured = old[0], [r for r in old[1:]]
    else:
        spec = model_spec(load_model(resolve_model(RunConfig().model))[0])
        header = {"header": True, "machine": platform.machine(),
                  "python": platform.python_version(), "torch": torch.__version__,
                  "model": RunConfig().model, "spec": spec_to_json(spec),
                  "measured": "peak RSS (VmHWM) above the RSS before train_local, "
                  "DP-SGD, fresh process per row"}
        measured = []
        for targets, rank, batch, precision in GRID:
            proc = subprocess.run([sys.executable, __file__, "--one",
                                   f"{targets};{rank};{batch};{precision}"],
                                  check=True, capture_output=True, text=True)
            measured.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(measured[-1]), flush=True)
    spec = spec_from_json(header["spec"])
    rows = [header] + [{**r, "predicted_mb": predicted_mb(spec, r)} for r in measured]
    for r in rows[1:]:
        r["error"] = round(r["predicted_mb"] / r["measured_mb"] - 1.0, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
