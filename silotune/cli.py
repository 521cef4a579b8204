"""The `silotune` command: thin argument parsing over the packages.

Jobs: simulate (researcher), coordinator / run (operator), agent (silo admin),
audit (auditor / DPO), certs (all), report (rebuild a run's report).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from silotune.config import ConfigError, RunConfig

_DEFAULTS = RunConfig()
_PLANNED = {
    "coordinator": "start the coordinator service (Flower SuperLink with TLS and node auth)",
    "run": "submit a federation run to a deployed coordinator and stream its progress",
    "agent": "run a silo client agent (Flower SuperNode) next to the silo's private data",
    "certs": "create the CA, the coordinator's TLS certificate and silo key pairs",
}


def _epsilon(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"epsilon must be a number or 'inf', got {text!r}") from None
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"epsilon must be > 0 (or 'inf' for a non-private run), got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="silotune",
        description="Federated, differentially private LoRA fine-tuning across data silos.")
    sub = p.add_subparsers(dest="job", metavar="JOB")

    s = sub.add_parser("simulate", help="simulate many silos on one machine (Flower + Ray)",
                       description="Run a federation of simulated silos on this machine. "
                       "With no arguments: SmolLM2-135M-Instruct, ICD-10-CM chapter "
                       "classification, 4 hospital silos (non-IID), FLoRA, DP-SGD at "
                       "epsilon 8.")
    d = _DEFAULTS
    s.add_argument("--silos", type=int, default=d.num_silos, help="number of silos (%(default)s)")
    s.add_argument("--rounds", type=int, default=d.rounds, help="federated rounds (%(default)s)")
    from silotune import strategies

    s.add_argument("--strategy", default=d.strategy,
                   help=f"aggregation rule: {', '.join(strategies.available())} (%(default)s)")
    s.add_argument("--model", default=d.model,
                   help="registered model name or a transformers causal-LM folder (%(default)s)")
    s.add_argument("--dataset", default=d.dataset,
                   help="registered dataset or a .jsonl/.csv/.parquet file (%(default)s)")
    s.add_argument("--text-column", default=d.text_column, help="text column (%(default)s)")
    s.add_argument("--label-column", default=d.label_column, help="label column (%(default)s)")
    s.add_argument("--epsilon", type=_epsilon, default=d.target_epsilon,
                   help="each silo's total epsilon budget; 'inf' = non-private (%(default)s)")
    s.add_argument("--delta", type=float, default=d.target_delta, help="DP delta (%(default)s)")
    s.add_argument("--fraction", type=float, default=d.fraction_train,
                   help="fraction of silos sampled per round (%(default)s)")
    s.add_argument("--local-steps", type=int, default=d.local_steps,
                   help="local optimiser steps per round (%(default)s)")
    s.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="expected (Poisson) batch size (%(default)s)")
    s.add_argument("--lr", type=float, default=d.learning_rate, help="learning rate (%(default)s)")
    s.add_argument("--ranks", default=",".join(map(str, d.lora_ranks)),
                   help="LoRA ranks, cycled over the silos (%(default)s)")
    s.add_argument("--test-size", type=int, default=d.test_size,
                   help="held-out examples for evaluation (%(default)s)")
    s.add_argument("--seed", type=int, default=d.seed,
                   help="public seed: data split, silo sampling, LoRA init; never DP noise")
    s.add_argument("--out", default=d.out_dir, help="output folder (%(default)s)")

    a = sub.add_parser("audit", help="verify privacy ledgers (chain, signatures, epsilon)")
    a.add_argument("ledgers", nargs="+", type=Path, help="ledger .jsonl files")

    r = sub.add_parser("report", help="rebuild report.html from a run's metrics.json")
    r.add_argument("run_dir", type=Path)

    for name, text in _PLANNED.items():
        sub.add_parser(name, help=f"{text} (not yet available)")
    return p


def _simulate(args: argparse.Namespace) -> int:
    from silotune.server.report import format_summary_table
    from silotune.simulations.launcher import simulate

    cfg = RunConfig(
        num_silos=args.silos, rounds=args.rounds, strategy=args.strategy, model=args.model,
        dataset=args.dataset, text_column=args.text_column, label_column=args.label_column,
        target_epsilon=args.epsilon, target_delta=args.delta, fraction_train=args.fraction,
        local_steps=args.local_steps, batch_size=args.batch_size,
        learning_rate=args.lr, lora_ranks=RunConfig.from_mapping({"lora-ranks": args.ranks}
                                                                 ).lora_ranks,
        test_size=args.test_size, seed=args.seed, out_dir=args.out)
    metrics = simulate(cfg)
    print()
    print(format_summary_table(metrics))
    print(f"\nwrote {Path(args.out) / 'metrics.json'}, {Path(args.out) / 'report.html'}, "
          f"{Path(args.out) / 'ledgers'}/")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from silotune.privacy.ledger import verify_ledger

    failed = False
    for path in args.ledgers:
        if not path.exists():
            print(f"{path}: ledger file not found", file=sys.stderr)
            failed = True
            continue
        problems = verify_ledger(path)
        print(f"{path}: {'OK' if not problems else 'FAILED'}")
        for problem in problems:
            print(f"  - {problem}")
        failed |= bool(problems)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `silotune` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.job is None:
        parser.print_help()
        return 2
    if args.job in _PLANNED:
        print(f"silotune {args.job}: {_PLANNED[args.job]}. Not available yet in this "
              "version; use `silotune simulate` for now.", file=sys.stderr)
        return 2
    from silotune.assets import AssetError
    from silotune.privacy.accounting import BudgetExhausted
    from silotune.strategies import UnknownStrategyError
    from silotune.strategies.base import AdapterError

    try:
        if args.job == "simulate":
            return _simulate(args)
        if args.job == "audit":
            return _audit(args)
        from silotune.server.report import write_report

        print(f"wrote {write_report(args.run_dir)}")
        return 0
    except (ConfigError, UnknownStrategyError, AssetError, AdapterError,
            BudgetExhausted) as err:
        print(f"silotune {args.job}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
