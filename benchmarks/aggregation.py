"""Time every aggregation rule on adapters shaped like real models' q/v LoRA adapters.

Writes ``benchmarks/results/aggregation.json``: a header row (machine, versions), then
rows ``{"strategy", "model", "silos", "dtype", "seconds", "first_seconds", "peak_mem_mb"}``
(``seconds``: median of the timed calls; ``first_seconds``: the first call, whose fresh
output memory is still being paged in). Adapters are
fp16 as they arrive on the wire by default (``--dtype fp32`` to change). Ranks are drawn from
{4, 8, 16, 32, 64} (equal-rank rules use 16 for every silo). Peak memory is what
tracemalloc sees NumPy allocate during the aggregation (inputs excluded).

    .venv/bin/python benchmarks/aggregation.py [--silos 10 100 1000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np

from silotune import strategies
from silotune.adapters.compression import WIRE_DTYPES
from silotune.adapters.types import LoraFactors, SiloAdapter

# (d_out, d_in) of the q and v projections, times the number of layers.
SHAPES = {
    # SmolLM2-135M: hidden 576, 3 KV heads x 64, 30 layers.
    "smollm2-135m": ({"q_proj": (576, 576), "v_proj": (192, 576)}, 30),
    # A 7B-class layer (Llama-2-7B: hidden 4096, v 4096); one layer keeps 1000 silos in RAM.
    "7b-class-1-layer": ({"q_proj": (4096, 4096), "v_proj": (4096, 4096)}, 1),
}
EQUAL_RANK_RULES = {"fedit", "fedsa"}


def make_adapters(model: str, silos: int, equal_rank: bool, shared_a: bool = False,
                  dtype: str = "fp16", seed: int = 0) -> list[SiloAdapter]:
    """Random adapters; with `shared_a` every silo's A is a prefix of one seeded A per
    module (FFA-LoRA's frozen A)."""
    per_layer, layers = SHAPES[model]
    rng = np.random.default_rng(seed)
    frozen = {(layer, name): rng.standard_normal((64, d_in), dtype=np.float32) * 0.02
              for layer in range(layers) for name, (_, d_in) in per_layer.items()}
    adapters = []
    for k in range(silos):
        rank = 16 if equal_rank else int(rng.choice([4, 8, 16, 32, 64]))
        modules = {}
        for layer in range(layers):
            for name, (d_out, d_in) in per_layer.items():
                a = (frozen[layer, name][:rank] if shared_a
                     else rng.standard_normal((rank, d_in), dtype=np.float32) * 0.02)
                b = rng.standard_normal((d_out, rank), dtype=np.float32) * 0.02
                modules[f"model.layers.{layer}.self_attn.{name}"] = LoraFactors(
                    A=a.astype(WIRE_DTYPES[dtype]), B=b.astype(WIRE_DTYPES[dtype]))
        adapters.append(SiloAdapter(silo=f"silo-{k:04d}", num_examples=int(rng.integers(50, 500)),
                                    scale=2.0, modules=modules))
    return adapters


def time_rule(name: str, adapters: list[SiloAdapter], repeats: int) -> dict[str, float]:
    """Seconds of the first (cold: fresh memory) and the median of `repeats` calls, and
    the peak NumPy memory of one extra call under tracemalloc (timed separately, since
    tracing slows allocation)."""
    rule = strategies.create(name)
    shapes = {m: (f.B.shape[0], f.A.shape[1]) for m, f in adapters[0].modules.items()}
    rule.setup({a.silo: a.modules[next(iter(a.modules))].rank for a in adapters}, shapes, 0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = rule.aggregate(adapters, None)
        times.append(time.perf_counter() - start)
        del result
    tracemalloc.start()
    result = rule.aggregate(adapters, None)
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    del result
    return {"seconds": round(statistics.median(times), 4), "first_seconds": round(times[0], 4),
            "peak_mem_mb": round(peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--silos", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--rules", nargs="+", default=strategies.available())
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed calls per rule; 'seconds' is their median")
    parser.add_argument("--dtype", choices=list(WIRE_DTYPES), default="fp16",
                        help="adapter dtype as received (the wire default is fp16)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "aggregation.json")
    args = parser.parse_args()
    rows: list[dict[str, object]] = [{
        "header": True, "machine": platform.machine(), "processor": platform.processor(),
        "python": platform.python_version(), "numpy": np.__version__,
        "cpus": __import__("os").cpu_count()}]
    for model in args.models:
        for silos in args.silos:
            for group in ("mixed", "equal", "ffa"):
                adapters = make_adapters(model, silos, equal_rank=group == "equal",
                                         shared_a=group == "ffa", dtype=args.dtype)
                for name in args.rules:
                    wanted = ("ffa" if name == "ffa" else
                              "equal" if name in EQUAL_RANK_RULES else "mixed")
                    if wanted != group:
                        continue
                    row = {"strategy": name, "model": model, "silos": silos,
                           "dtype": args.dtype, **time_rule(name, adapters, args.repeats)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                del adapters
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
