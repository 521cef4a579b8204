"""The `silotune` command: thin argument parsing over the packages.

Jobs: simulate (researcher), coordinator / run (operator), agent (silo admin),
audit (auditor / DPO), certs (all), report (rebuild a run's report).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from silotune.cli_flags import (
    FIELDS,
    InputError,
    OneLineParser,
    Sources,
    add_config_flag,
    add_setting_flags,
    check_inputs,
    fail,
    in_user_terms,
    run_config,
    summary,
)
from silotune.config import ConfigError, RunConfig

_DEFAULTS = RunConfig()
# Settings shown in their own groups of `silotune simulate --help`.
_CROSSLM = ("mode", "slm", "slm_steps", "slm_learning_rate", "crosslm_per_label",
            "crosslm_threshold", "crosslm_weighting", "llm_steps", "llm_learning_rate",
            "max_new_tokens")
_FEDPIPE = ("profiles", "plan_mode", "calibration_steps", "calibration_batch")
_GROUPED = {*_CROSSLM, *_FEDPIPE, "resume"}  # resume: --resume of simulations/outdir.py


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="silotune",
        description="Federated, differentially private LoRA fine-tuning across data silos.")
    p.add_argument("--version", action="version",
                   version=f"silotune {importlib.metadata.version('silotune')}")
    sub = p.add_subparsers(dest="job", metavar="JOB")

    s = sub.add_parser("simulate", help="simulate many silos on one machine (Flower + Ray)",
                       description="Run a federation of simulated silos on this machine. "
                       "With no arguments: SmolLM2-135M-Instruct, ICD-10-CM chapter "
                       "classification, 4 hospital silos (non-IID), FLoRA, DP-SGD at "
                       "epsilon 8. Every setting is a flag named as its key in "
                       "[tool.flwr.app.config] (pyproject.toml), the key of a --config file "
                       "and of `flwr run --run-config`; older short names (--silos, "
                       "--rounds, --epsilon, --lr, ...) still work.")
    add_config_flag(s)
    add_setting_flags(s, [n for n in FIELDS if n not in _GROUPED])
    s.add_argument("--ray-address", metavar="HOST:PORT",
                   help="run the silos on this existing Ray cluster (started with `ray "
                   "start --head`) instead of a private Ray on this machine")
    from silotune.simulations.outdir import add_out_dir_arguments

    add_out_dir_arguments(s)  # --resume (the `resume` setting), --new-budget
    add_setting_flags(s.add_argument_group("CrossLM mode (--mode crosslm)"), _CROSSLM)
    add_setting_flags(s.add_argument_group("FedPipe automatic configuration (--profiles)"),
                      _FEDPIPE)

    pl = sub.add_parser("plan", help="print the FedPipe per-silo plan of a simulation",
                        description="Score the weight matrices on every simulated silo's "
                        "data, then print each silo's configuration (targets, rank, batch, "
                        "base precision), its modelled memory and time against its "
                        "limits, and the binding constraint. --profiles is required.")
    add_config_flag(pl)
    add_setting_flags(pl, ("num_silos", "model", "dataset", "text_column", "label_column",
                           "partition", "dirichlet_alpha", "test_size", "local_steps",
                           "seed", *_FEDPIPE))

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
        "    RDP value must lie between PLD and a fresh RDP bound\n"
        "  - with --heads: every ledger head the run's coordinator accepted, at its seq\n"
        "    and signed by the key it recorded; --strict fails a key not pinned\n\n"
        "Exit status: 0 when every ledger is OK, 1 when any ledger has a problem or is\n"
        "missing, 2 for usage errors (including an unreadable --public-key or --heads).")
    a.add_argument("ledgers", nargs="+", type=Path, metavar="LEDGER",
                   help="ledger .jsonl files")
    a.add_argument("--public-key", type=Path, metavar="KEY",
                   help="the silo's Ed25519 public key for every LEDGER: a PEM file or a file "
                   "holding the hex signer_public_key; without it, the key that signed seq 0 "
                   "is trusted")
    a.add_argument("--heads", type=Path, metavar="METRICS", help="a run's metrics.json: "
                   "check each LEDGER against the ledger heads its coordinator recorded")
    a.add_argument("--strict", action="store_true", help="fail a key that is not pinned")
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


def _plan(args: argparse.Namespace, argv: Sequence[str]) -> int:
    cfg, _ = run_config(args, argv)
    if not cfg.profiles:
        raise InputError("--profiles is required: name the mix of silo resource profiles "
                         "to plan for (see silotune plan --help)")
    from silotune.simulations.plan import plan_offline

    print(plan_offline(cfg).table())
    return 0


def _check_simulation(args: argparse.Namespace, argv: Sequence[str]) -> RunConfig:
    """The run's config, every input checked before the heavy imports (torch, Flower,
    Ray): a bad flag, file key, model, data file or split fails in one line at once."""
    cfg, sources = run_config(args, argv)
    from silotune.simulations.outdir import refusal

    if why := refusal(Path(cfg.out_dir), cfg.resume, args.new_budget, cfg.mode):
        raise InputError(why)
    return check_inputs(cfg, sources, emit=print)


def _simulate(args: argparse.Namespace, cfg: RunConfig) -> int:
    from silotune.simulations.outdir import prepare_out_dir

    out = Path(cfg.out_dir)
    prepare_out_dir(out, resume=cfg.resume, new_budget=args.new_budget, mode=cfg.mode,
                    emit=print)  # before model loading and Ray
    from silotune.ml.assets import resolve_model
    from silotune.ml.targets import resolve_targets_of

    # a wrong --lora-targets fails here in one line, not in the coordinator's thread
    cfg = replace(cfg, lora_targets=resolve_targets_of(resolve_model(cfg.model),
                                                       cfg.lora_targets))
    print(f"[config] {summary(cfg)} (every setting: {out / 'config.json'})")
    from silotune.server.report import format_summary_table
    from silotune.simulations.launcher import simulate

    metrics = simulate(cfg, progress=say, ray_address=args.ray_address)
    print()
    if cfg.mode == "crosslm":
        from silotune.server.crosslm import format_crosslm_table

        print(format_crosslm_table(metrics))
    else:
        print(format_summary_table(metrics))
    print(f"\nwrote {out / 'metrics.json'}, {out / 'report.html'}, {out / 'ledgers'}/")
    return 0


def say(line: str) -> None:
    """Print a run's progress line on stdout, above the rounds bar when one is drawn
    (tqdm clears the bar, prints, redraws it): never onto the bar's line."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def _report(run_dir: Path) -> int:
    if not (run_dir / "metrics.json").is_file():
        raise InputError(f"{run_dir / 'metrics.json'} not found: give the --out folder of a "
                         "`silotune simulate` or `silotune run`")
    from silotune.server.report import write_report

    try:
        written = write_report(run_dir)
    except ValueError as err:
        raise InputError(f"{run_dir / 'metrics.json'}: {err}") from None
    print(f"wrote {written}")
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

    from silotune.privacy import audit as ledgers
    from silotune.privacy.recorded_heads import HeadsFileError, load_heads
    from silotune.progress import Tracker

    try:
        key = ledgers.load_public_key(args.public_key) if args.public_key else None
        heads = load_heads(args.heads) if args.heads is not None else None
    except (ledgers.KeyFileError, HeadsFileError) as err:
        print(f"silotune audit: error: {err}", file=sys.stderr)
        return 2
    audits = []
    # progress on stderr for several ledgers (a bar on a terminal); --json stays pure JSON
    show = len(args.ledgers) > 1 and not args.json
    with Tracker(len(args.ledgers), "audit", emit=None if show else _quiet,
                 bar=None if show else False) as tracker:
        for path in args.ledgers:
            audits.append(ledgers.audit_ledger(path, key, heads=heads, strict=args.strict))
            tracker.advance(path.name)
    if args.json:
        print(json.dumps([a.to_dict() for a in audits], indent=2, allow_nan=False))
    else:
        print(ledgers.format_table(audits))
    failed = not all(a.ok for a in audits)
    if args.plot is not None:
        try:
            written = ledgers.plot_epsilon(audits, args.plot)
        except OSError as err:
            print(f"silotune audit: error: cannot write plot {args.plot}: "
                  f"{err.strerror or err}", file=sys.stderr)
            return 1
        print(f"wrote {written}", file=sys.stderr if args.json else sys.stdout)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `silotune` command; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from silotune.deploy.cli import DEPLOY_JOBS, run_deploy_job, show_ledger_key

    if (shown := show_ledger_key(argv)) is not None:
        return shown  # `agent --show-ledger-key` needs none of the agent's other flags
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.job is None:
        parser.print_help()
        return 2
    if args.job in DEPLOY_JOBS:  # before the ML imports below: agents start in seconds
        return run_deploy_job(args)
    try:  # likewise: bad input is refused at once, before torch, Flower and Ray load
        if args.job == "simulate":
            cfg = _check_simulation(args, argv)
        if args.job == "report":
            return _report(args.run_dir)
    except InputError as err:
        return fail(args.job, err)
    from silotune.adapters.types import AdapterError
    from silotune.ml.assets import AssetError
    from silotune.ml.targets import TargetError
    from silotune.planning.configurator import InfeasibleProfileError
    from silotune.privacy.accounting import BudgetExhausted
    from silotune.strategies import UnknownStrategyError

    try:
        if args.job == "simulate":
            return _simulate(args, cfg)
        if args.job == "audit":
            return _audit_empirical(args) if args.empirical else _audit(args)
        return _plan(args, argv)
    except (InputError, ConfigError, UnknownStrategyError, AssetError, AdapterError,
            BudgetExhausted, InfeasibleProfileError, TargetError) as err:
        if args.job == "audit":
            return fail(args.job, err)
        return fail(args.job, in_user_terms(str(err), Sources(argv)))  # settings as flags


if __name__ == "__main__":
    sys.exit(main())
