"""Time every aggregation rule on adapters shaped like real models' q/v LoRA adapters.

Writes ``benchmarks/results/aggregation.json``: a header row (machine, versions), then
rows ``{"strategy", "model", "silos", "seconds", "peak_mem_mb"}``. Ranks are drawn from
{4, 8, 16, 32, 64} (equal-rank rules use 16 for every silo). Peak memory is what
tracemalloc sees NumPy allocate during the aggregation (inputs excluded).

    .venv/bin/python benchmarks/aggregation.py [--silos 10 100 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np

from silotune import strategies
from silotune.strategies.base import LoraFactors, SiloAdapter

# (d_out, d_in) of the q and v projections, times the number of layers.
SHAPES = {
    # SmolLM2-135M: hidden 576, 3 KV heads x 64, 30 layers.
    "smollm2-135m": ({"q_proj": (576, 576), "v_proj": (192, 576)}, 30),
    # A 7B-class layer (Llama-2-7B: hidden 4096, v 4096); one layer keeps 1000 silos in RAM.
    "7b-class-1-layer": ({"q_proj": (4096, 4096), "v_proj": (4096, 4096)}, 1),
}
EQUAL_RANK_RULES = {"fedit", "fedsa"}


def make_adapters(model: str, silos: int, equal_rank: bool, seed: int = 0) -> list[SiloAdapter]:
    per_layer, layers = SHAPES[model]
    rng = np.random.default_rng(seed)
    adapters = []
    for k in range(silos):
        rank = 16 if equal_rank else int(rng.choice([4, 8, 16, 32, 64]))
        modules = {}
        for layer in range(layers):
            for name, (d_out, d_in) in per_layer.items():
                modules[f"model.layers.{layer}.self_attn.{name}"] = LoraFactors(
                    A=rng.standard_normal((rank, d_in), dtype=np.float32) * 0.02,
                    B=rng.standard_normal((d_out, rank), dtype=np.float32) * 0.02)
        adapters.append(SiloAdapter(silo=f"silo-{k:04d}", num_examples=int(rng.integers(50, 500)),
                                    scale=2.0, modules=modules))
    return adapters


def time_rule(name: str, adapters: list[SiloAdapter]) -> tuple[float, float]:
    rule = strategies.create(name)
    shapes = {m: (f.B.shape[0], f.A.shape[1]) for m, f in adapters[0].modules.items()}
    rule.setup({a.silo: a.modules[next(iter(a.modules))].rank for a in adapters}, shapes, 0)
    tracemalloc.start()
    start = time.perf_counter()
    result = rule.aggregate(adapters, None)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    del result
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--silos", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "aggregation.json")
    args = parser.parse_args()
    rows: list[dict[str, object]] = [{
        "header": True, "machine": platform.machine(), "processor": platform.processor(),
        "python": platform.python_version(), "numpy": np.__version__,
        "cpus": __import__("os").cpu_count()}]
    for model in args.models:
        for silos in args.silos:
            for equal in (False, True):
                adapters = make_adapters(model, silos, equal_rank=equal)
                for name in strategies.available():
                    if (name in EQUAL_RANK_RULES) != equal:
                        continue
                    seconds, peak = time_rule(name, adapters)
                    row = {"strategy": name, "model": model, "silos": silos,
                           "seconds": round(seconds, 4), "peak_mem_mb": round(peak, 1)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                del adapters
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
