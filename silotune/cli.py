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
    s.add_argument("--max-update-norm", default="auto",
                   help="exclude replies whose update norm ||s B A|| exceeds this; auto: "
                   "the most the round's training can produce, with a margin (%(default)s)")
    from silotune.simulations.partition import PARTITIONERS

    s.add_argument("--partition", default=d.partition, choices=sorted(PARTITIONERS),
                   help="how the training rows are split over silos: dirichlet (label "
                   "skew), iid, natural (whole label groups, e.g. ICD chapters, per silo), "
                   "size (silo sizes skewed) (%(default)s)")
    s.add_argument("--alpha", type=float, default=d.dirichlet_alpha,
                   help="Dirichlet concentration of the dirichlet and size partitions; "
                   "small = strong skew (%(default)s)")
    s.add_argument("--ray-address", metavar="HOST:PORT",
                   help="run the silos on this existing Ray cluster (started with `ray "
                   "start --head`) instead of a private Ray on this machine")
    s.add_argument("--client-dp-noise", type=float, default=d.client_dp_noise, metavar="Z",
                   help="client-level DP (DP-FedAvg, unit = one silo): noise multiplier of "
                   "the coordinator's Gaussian noise; 0 = off (%(default)s)")
    s.add_argument("--client-dp-clip", type=float, default=d.client_dp_clip, metavar="C",
                   help="client-level DP: clip norm of each silo's update ||s B A|| "
                   "(%(default)s)")
    s.add_argument("--test-size", type=int, default=d.test_size,
                   help="held-out examples for evaluation (%(default)s)")
    s.add_argument("--seed", type=int, default=d.seed,
                   help="public seed: data split, silo sampling, LoRA init; never DP noise")
    s.add_argument("--dp-noise-seed", type=int, default=d.dp_noise_seed, metavar="N",
                   help="seed the simulated silos' DP noise from N, so that two runs "
                   "differ only by what you changed (research comparisons; the ledgers "
                   "record it, and the noise is predictable to anyone who knows N); -1 = "
                   "OS-seeded noise, as in every deployment (%(default)s)")
    s.add_argument("--out", default=d.out_dir, help="output folder (%(default)s)")
    from silotune.simulations.outdir import add_out_dir_arguments

    add_out_dir_arguments(s)  # --resume, --new-budget
    c = s.add_argument_group("CrossLM mode (--mode crosslm)")
    c.add_argument("--mode", choices=("lora", "crosslm"), default=d.mode,
                   help="lora: federated LoRA; crosslm: central LLM (--model) and silo "
                   "SLMs (--slm) improve each other through scored synthetic data "
                   "(%(default)s)")
    c.add_argument("--slm", default=d.slm,
                   help="silo small model: registered name or encoder folder (%(default)s)")
    c.add_argument("--slm-steps", type=int, default=d.slm_steps,
                   help="DP-SGD steps per SLM training (%(default)s)")
    c.add_argument("--slm-lr", type=float, default=d.slm_learning_rate,
                   help="SLM learning rate (%(default)s)")
    c.add_argument("--per-label", type=int, default=d.crosslm_per_label,
                   help="synthetic examples per label per round; 0 = SLMs on private "
                   "data alone (%(default)s)")
    c.add_argument("--threshold", type=float, default=d.crosslm_threshold,
                   help="keep synthetic examples with feedback >= this (%(default)s)")
    c.add_argument("--weighting", choices=("feedback", "uniform"), default=d.crosslm_weighting,
                   help="LLM update weights: SLM feedback, or uniform (ablation) (%(default)s)")
    c.add_argument("--llm-steps", type=int, default=d.llm_steps,
                   help="LoRA steps of the central LLM per round (%(default)s)")
    c.add_argument("--llm-lr", type=float, default=d.llm_learning_rate,
                   help="LLM learning rate (%(default)s)")
    c.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="tokens per generated example (%(default)s)")
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
    e = a.add_argument_group(
        "empirical audit (--empirical LEDGER --signing-key KEY)",
        "Train once on the silo's data with m Dirac gradient canaries, each inserted with "
        "probability 1/2 (Steinke, Nasr & Jagielski 2023), bound epsilon from below at "
        "95%% confidence and append a signed 'audit' entry to LEDGER. The model, data and "
        "LoRA settings are those of `silotune simulate` (same flags and defaults); sigma and "
        "the clip norm default to the ledger's last train entry.")
    e.add_argument("--empirical", action="store_true",
                   help="run the empirical one-run audit on one silo (exactly one LEDGER)")
    e.add_argument("--signing-key", type=Path, metavar="KEY",
                   help="the silo's Ed25519 ledger key (OUT/silos/<silo>/ledger-signing-key.pem)")
    e.add_argument("--silo-index", type=int, default=0, help="which silo (%(default)s)")
    e.add_argument("--silos", type=int, default=_DEFAULTS.num_silos,
                   help="silos in the federation split (%(default)s)")
    e.add_argument("--model", default=_DEFAULTS.model, help="model (%(default)s)")
    e.add_argument("--dataset", default=_DEFAULTS.dataset, help="dataset (%(default)s)")
    e.add_argument("--seed", type=int, default=_DEFAULTS.seed,
                   help="public seed of the data split (%(default)s)")
    e.add_argument("--canaries", type=int, default=1000, help="m (%(default)s)")
    e.add_argument("--noise-multiplier", type=float,
                   help="sigma (default: the ledger's; 0 = no noise, a non-private control)")
    e.add_argument("--clip", type=float, help="per-example clip norm (default: the ledger's)")
    e.add_argument("--audit-steps", type=int, default=20,
                   help="DP-SGD steps of the audit run (%(default)s)")
    e.add_argument("--no-insert", action="store_true",
                   help="draw the canaries but insert none (negative control: bound 0)")

    r = sub.add_parser("report", help="rebuild report.html from a run's metrics.json")
    r.add_argument("run_dir", type=Path)

    from silotune.deploy.cli import add_deploy_parsers

    add_deploy_parsers(sub)
    return p


def _fedpipe_arguments(p: argparse.ArgumentParser, required: bool = False) -> None:
    from silotune.planning.profiles import MIXES

    p.add_argument("--profiles", default=_DEFAULTS.profiles, required=required,
                   metavar="MIX", help="FedPipe automatic configuration: silo resource "
                   f"profiles from a named mix ({', '.join(sorted(MIXES))}); each silo gets "
                   "its own targets, rank, batch and base precision (off by default)")
    p.add_argument("--plan-mode", choices=("per-silo", "uniform"),
                   default=_DEFAULTS.plan_mode,
                   help="per-silo: each silo's own optimum; uniform: every silo gets the "
                   "configuration that fits the weakest profile (%(default)s)")


def _plan(args: argparse.Namespace) -> int:
    from silotune.simulations.checks import check_names
    from silotune.simulations.plan import plan_offline

    cfg = RunConfig(num_silos=args.silos, model=args.model, dataset=args.dataset,
                    local_steps=args.local_steps, seed=args.seed, profiles=args.profiles,
                    plan_mode=args.plan_mode)
    check_names(cfg)
    print(plan_offline(cfg).table())
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from silotune.simulations.outdir import prepare_out_dir

    cfg = RunConfig(
        num_silos=args.silos, rounds=args.rounds, strategy=args.strategy, model=args.model,
        dataset=args.dataset, text_column=args.text_column, label_column=args.label_column,
        target_epsilon=args.epsilon, target_delta=args.delta, fraction_train=args.fraction,
        local_steps=args.local_steps, batch_size=args.batch_size,
        learning_rate=args.lr, lora_ranks=RunConfig.from_mapping({"lora-ranks": args.ranks}
                                                                 ).lora_ranks,
        test_size=args.test_size, seed=args.seed, dp_noise_seed=args.dp_noise_seed,
        out_dir=args.out, wire_dtype=args.wire_dtype, upload_density=args.compress,
        max_update_norm=RunConfig.from_mapping({"max-update-norm": args.max_update_norm}
                                               ).max_update_norm, partition=args.partition,
        dirichlet_alpha=args.alpha, client_dp_noise=args.client_dp_noise,
        client_dp_clip=args.client_dp_clip, mode=args.mode, slm=args.slm,
        slm_steps=args.slm_steps, slm_learning_rate=args.slm_lr,
        crosslm_per_label=args.per_label, crosslm_threshold=args.threshold,
        crosslm_weighting=args.weighting, llm_steps=args.llm_steps,
        llm_learning_rate=args.llm_lr, max_new_tokens=args.max_new_tokens,
        profiles=args.profiles, plan_mode=args.plan_mode, base_precision=args.precision,
        resume=args.resume)
    prepare_out_dir(Path(cfg.out_dir), resume=cfg.resume, new_budget=args.new_budget,
                    mode=cfg.mode, emit=print)  # before model loading and Ray
    from silotune.server.report import format_summary_table
    from silotune.simulations.launcher import simulate

    metrics = simulate(cfg, ray_address=args.ray_address)
    print()
    if cfg.mode == "crosslm":
        from silotune.server.crosslm import format_crosslm_table

        print(format_crosslm_table(metrics))
    else:
        print(format_summary_table(metrics))
    print(f"\nwrote {Path(args.out) / 'metrics.json'}, {Path(args.out) / 'report.html'}, "
          f"{Path(args.out) / 'ledgers'}/")
    return 0


def _quiet(line: str) -> None:
    """Emit sink that drops the line."""


def _audit_empirical(args: argparse.Namespace) -> int:
    import json

    from silotune.privacy.canary_audit import SiloAuditSpec
    from silotune.simulations.audit import audit_simulated_silo

    if len(args.ledgers) != 1 or args.signing_key is None:
        print("silotune audit: error: --empirical needs exactly one LEDGER (the silo's) and "
              "--signing-key (the silo's ledger key)", file=sys.stderr)
        return 2
    run = RunConfig(model=args.model, dataset=args.dataset, num_silos=args.silos,
                    seed=args.seed)
    spec = SiloAuditSpec(silo_index=args.silo_index, canaries=args.canaries,
                         noise_multiplier=args.noise_multiplier, max_grad_norm=args.clip,
                         steps=args.audit_steps, insert=not args.no_insert)
    try:
        audit, entry = audit_simulated_silo(run, spec, args.ledgers[0], args.signing_key)
    except ValueError as err:
        print(f"silotune audit: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(entry, indent=2, allow_nan=False))
    else:
        r = audit.result
        acc = "no DP (sigma 0)" if audit.eps_accounted is None else \
            f"{audit.eps_accounted:.4f}"
        print(f"empirical audit of {entry['silo_id']}: epsilon lower bound "
              f"{r.eps_lower_bound:.4f} (95% confidence; m={r.m}, {r.v} of {r.r} guesses "
              f"correct, AUC {r.auc if r.auc is None else round(r.auc, 3)}), accounted "
              f"epsilon {acc}: {'OK' if audit.sound else 'VIOLATION'}; appended as seq "
              f"{entry['seq']} to {args.ledgers[0]}")
    return 0 if audit.sound else 1


def _audit(args: argparse.Namespace) -> int:
    import json

    from silotune.privacy.audit import (
        KeyFileError,
        audit_ledger,
        format_table,
        load_public_key,
        plot_epsilon,
    )
    from silotune.progress import Tracker

    try:
        key = load_public_key(args.public_key) if args.public_key is not None else None
    except KeyFileError as err:
        print(f"silotune audit: error: {err}", file=sys.stderr)
        return 2
    audits = []
    # progress on stderr for several ledgers (a bar on a terminal); --json stays pure JSON
    show = len(args.ledgers) > 1 and not args.json
    with Tracker(len(args.ledgers), "audit", emit=None if show else _quiet,
                 bar=None if show else False) as tracker:
        for path in args.ledgers:
            audits.append(audit_ledger(path, key))
            tracker.advance(path.name)
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
    from silotune.deploy.cli import DEPLOY_JOBS, run_deploy_job

    if args.job in DEPLOY_JOBS:  # before the ML imports below: agents start in seconds
        return run_deploy_job(args)
    if args.job == "simulate":  # likewise: an OUT holding old silos is refused at once
        from silotune.simulations.outdir import refusal

        if why := refusal(Path(args.out), args.resume, args.new_budget, args.mode):
            print(f"silotune simulate: error: {why}", file=sys.stderr)
            return 2
    from silotune.adapters.types import AdapterError
    from silotune.ml.assets import AssetError
    from silotune.planning.configurator import InfeasibleProfileError
    from silotune.privacy.accounting import BudgetExhausted
    from silotune.strategies import UnknownStrategyError

    try:
        if args.job == "simulate":
            return _simulate(args)
        if args.job == "audit":
            return _audit_empirical(args) if args.empirical else _audit(args)
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
