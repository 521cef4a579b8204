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
    s.add_argument("--wire-dtype", choices=("fp16", "fp32"), default=d.wire_dtype,
                   help="float type of adapters on the wire (%(default)s)")
    s.add_argument("--compress", type=float, default=d.upload_density, metavar="DENSITY",
                   help="keep this fraction of each uploaded adapter's changes, as signs "
                   "and one scale per tensor (ComPEFT-style); 1 = off (%(default)s)")
    s.add_argument("--max-update-norm", type=float, default=d.max_update_norm,
                   help="exclude replies whose update norm ||s B A|| exceeds this "
                   "(%(default)s)")
    s.add_argument("--test-size", type=int, default=d.test_size,
                   help="held-out examples for evaluation (%(default)s)")
    s.add_argument("--seed", type=int, default=d.seed,
                   help="public seed: data split, silo sampling, LoRA init; never DP noise")
    s.add_argument("--out", default=d.out_dir, help="output folder (%(default)s)")
    _fedpipe_arguments(s)
    s.add_argument("--precision", default=d.base_precision,
                   help="base precision of every silo's training copy when --profiles is "
                   "off: fp32 or bf16 (%(default)s)")

    pl = sub.add_parser("plan", help="print the FedPipe per-silo plan of a simulation",
                        description="Score the weight matrices on every simulated silo's "
                        "data, then print each silo's configuration (targets, rank, batch, "
                        "base precision), its modelled memory and time against its "
                        "limits, and the binding constraint.")
    pl.add_argument("--silos", type=int, default=d.num_silos, help="silos (%(default)s)")
    pl.add_argument("--model", default=d.model, help="model (%(default)s)")
    pl.add_argument("--dataset", default=d.dataset, help="dataset (%(default)s)")
    pl.add_argument("--local-steps", type=int, default=d.local_steps,
                    help="local steps per round (%(default)s)")
    pl.add_argument("--seed", type=int, default=d.seed, help="public seed (%(default)s)")
    _fedpipe_arguments(pl, required=True)

    a = sub.add_parser(
        "audit", help="verify privacy ledgers (chain, signatures, epsilon)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Verify silo privacy ledgers (one JSONL file per silo and dataset).\n\n"
        "Checked for every ledger:\n"
        "  - seq numbers 0, 1, 2, ... and the prev_hash chain (entries deleted, added or\n"
        "    reordered)\n"
        "  - entry_hash recomputed over each entry (content changed after signing)\n"
        "  - the Ed25519 signature of each entry, against --public-key if given, else\n"
        "    against the key that signed seq 0 (every entry must be signed by it)\n"
        "  - per train entry: epsilon recomputed from its accounting_history (PRV or\n"
        "    RDP, within 1e-6), epsilon never decreasing, never above epsilon_limit,\n"
        "    and histories only growing\n"
        "  - the final cumulative epsilon recomputed now with dp_accounting PLD and RDP:\n"
        "    a PRV value must agree with PLD within 2% (0.02 for small epsilons), an\n"
        "    RDP value must lie between PLD and a fresh RDP bound\n\n"
        "A ledger cannot show that entries were cut from its end: compare its last\n"
        "entry_hash with a head hash published elsewhere.\n\n"
        "Exit status: 0 when every ledger is OK, 1 when any ledger has a problem or is\n"
        "missing, 2 for usage errors (including an unreadable --public-key).")
    a.add_argument("ledgers", nargs="+", type=Path, metavar="LEDGER",
                   help="ledger .jsonl files")
    a.add_argument("--public-key", type=Path, metavar="KEY",
                   help="the silo's Ed25519 public key for every LEDGER: a PEM file or a file "
                   "holding the hex signer_public_key; without it, the key that signed seq 0 "
                   "is trusted")
    a.add_argument("--json", action="store_true",
                   help="print a JSON list (one object per ledger) instead of the table")
    a.add_argument("--plot", type=Path, metavar="FILE",
                   help="write a PNG of cumulative epsilon per round and silo")

    r = sub.add_parser("report", help="rebuild report.html from a run's metrics.json")
    r.add_argument("run_dir", type=Path)

    for name, text in _PLANNED.items():
        sub.add_parser(name, help=f"{text} (not yet available)")
    return p


def _fedpipe_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    from silotune.simulations.profiles import MIXES

    p.add_argument("--profiles", default=_DEFAULTS.profiles, required=required,
                   metavar="MIX", help="FedPipe automatic configuration: silo resource "
                   f"profiles from a named mix ({', '.join(sorted(MIXES))}); each silo gets "
                   "its own targets, rank, batch and base precision (off by default)")
    p.add_argument("--plan-mode", choices=("per-silo", "uniform"),
                   default=_DEFAULTS.plan_mode,
                   help="per-silo: each silo's own optimum; uniform: every silo gets the "
                   "configuration that fits the weakest profile (%(default)s)")


def _plan(args: argparse.Namespace) -> int:
    from silotune.simulations.plan import plan_offline

    cfg = RunConfig(num_silos=args.silos, model=args.model, dataset=args.dataset,
                    local_steps=args.local_steps, seed=args.seed, profiles=args.profiles,
                    plan_mode=args.plan_mode)
    print(plan_offline(cfg).table())
    return 0


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
        test_size=args.test_size, seed=args.seed, out_dir=args.out,
        wire_dtype=args.wire_dtype, upload_density=args.compress,
        max_update_norm=args.max_update_norm, profiles=args.profiles,
        plan_mode=args.plan_mode, base_precision=args.precision)
    metrics = simulate(cfg)
    print()
    print(format_summary_table(metrics))
    print(f"\nwrote {Path(args.out) / 'metrics.json'}, {Path(args.out) / 'report.html'}, "
          f"{Path(args.out) / 'ledgers'}/")
    return 0


def _audit(args: argparse.Namespace) -> int:
    import json

    from silotune.privacy.audit import (
        KeyFileError,
        audit_ledger,
        format_table,
        load_public_key,
        plot_epsilon,
    )

    try:
        key = load_public_key(args.public_key) if args.public_key is not None else None
    except KeyFileError as err:
        print(f"silotune audit: error: {err}", file=sys.stderr)
        return 2
    audits = [audit_ledger(path, key) for path in args.ledgers]
    if args.json:
        print(json.dumps([a.to_dict() for a in audits], indent=2, allow_nan=False))
    else:
        print(format_table(audits))
    failed = not all(a.ok for a in audits)
    if args.plot is not None:
        try:
            written = plot_epsilon(audits, args.plot)
        except OSError as err:
            print(f"silotune audit: error: cannot write plot {args.plot}: "
                  f"{err.strerror or err}", file=sys.stderr)
            return 1
        print(f"wrote {written}", file=sys.stderr if args.json else sys.stdout)
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
    from silotune.strategies.configurator import InfeasibleProfileError

    try:
        if args.job == "simulate":
            return _simulate(args)
        if args.job == "audit":
            return _audit(args)
        if args.job == "plan":
            return _plan(args)
        from silotune.server.report import write_report

        print(f"wrote {write_report(args.run_dir)}")
        return 0
    except (ConfigError, UnknownStrategyError, AssetError, AdapterError,
            BudgetExhausted, InfeasibleProfileError) as err:
        print(f"silotune {args.job}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
