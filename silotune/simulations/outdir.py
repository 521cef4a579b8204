"""`silotune simulate`'s output folder: never continue old simulated silos by accident.

A simulated silo keeps its privacy ledger in ``OUT/ledgers/<silo>.jsonl`` and its state
(ledger key, kept replies) in ``OUT/silos/<silo>/``. A second simulation into the same
``OUT`` would continue those ledgers: the silos' lifetime budgets are already (partly)
spent, so they train at a much larger noise or refuse. So a folder whose ``ledgers/``
holds any ``*.jsonl`` is refused unless the user says which of the two they mean:

- ``--resume``: continue the same federation from ``OUT/checkpoint`` (the silos keep
  their ledgers, as they must);
- ``--new-budget``: start fresh simulated silos; the old ``ledgers/``, ``silos/`` and
  ``checkpoint/`` move to ``OUT/previous-<UTC timestamp>/``, never deleted.

Only the standard library and `silotune.config` here: the check runs before the heavy
imports (torch, model loading, Ray), so a refusal comes at once.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from pathlib import Path

from silotune.config import ConfigError

# What belongs to one federation of simulated silos, moved aside together by --new-budget.
FEDERATION_STATE = ("ledgers", "silos", "checkpoint")
CHECKPOINT_STATE = Path("checkpoint") / "state.json"  # silotune/server/checkpoint.py


class OutDirError(ConfigError):
    """The output folder holds another simulation's silos (see the module docstring)."""


def add_out_dir_arguments(p: argparse.ArgumentParser) -> None:
    """`silotune simulate`'s --resume and --new-budget (one or the other)."""
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the federation whose checkpoint is in OUT/checkpoint "
                       "(its silos keep their ledgers and spent budgets)")
    again.add_argument("--new-budget", action="store_true",
                       help="start fresh simulated silos in an OUT that holds old ones: "
                       "their ledgers, state and checkpoint move to OUT/previous-<time>/ "
                       "(without --resume or --new-budget such an OUT is refused)")


def existing_ledgers(out: Path) -> list[Path]:
    """The ledger files in ``out/ledgers/``, sorted."""
    folder = Path(out) / "ledgers"
    return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []


def check_out_dir(out: Path, *, resume: bool = False, new_budget: bool = False,
                  mode: str = "lora") -> None:
    """Raise `OutDirError` when a simulation into `out` would continue old silos'
    ledgers without ``--resume`` or ``--new-budget`` (or cannot resume)."""
    out = Path(out)
    if resume and new_budget:
        raise OutDirError("--resume and --new-budget exclude each other: continue the run "
                          f"in {out}, or start fresh silos there, not both")
    ledgers = existing_ledgers(out)
    if resume and mode == "crosslm":
        raise OutDirError("--resume: a CrossLM run writes no checkpoint and cannot be "
                          "resumed; drop --resume (with --new-budget when "
                          f"{out / 'ledgers'} holds old silos' ledgers)")
    if not ledgers or new_budget:
        return
    if resume:
        if not (out / CHECKPOINT_STATE).is_file():
            raise OutDirError(
                f"--resume: {out / 'ledgers'} holds {len(ledgers)} silo ledger(s) but "
                f"{out / CHECKPOINT_STATE} does not exist, so there is no federation to "
                "continue; use --new-budget to start fresh silos (the old ones move "
                "aside) or another --out folder")
        return
    raise OutDirError(
        f"{out} already holds the ledgers of simulated silos ({len(ledgers)} in "
        f"{out / 'ledgers'}), whose budgets are (partly) spent: add --resume to continue "
        "that federation from its checkpoint, or --new-budget to start fresh silos (the "
        f"old ledgers and silo state move to {out / 'previous-<timestamp>'}), or choose "
        "another --out folder")


def move_aside(out: Path) -> Path | None:
    """Move ``out``'s ledgers, silo state and checkpoint into a new
    ``out/previous-<UTC timestamp>/``; return that folder, or None when none existed."""
    out = Path(out)
    present = [name for name in FEDERATION_STATE if (out / name).exists()]
    if not present:
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = out / f"previous-{stamp}"
    suffix = 1
    while target.exists():  # two fresh starts within one second
        suffix += 1
        target = out / f"previous-{stamp}-{suffix}"
    target.mkdir(parents=True)
    for name in present:
        (out / name).rename(target / name)
    return target


def refusal(out: Path, resume: bool, new_budget: bool, mode: str) -> str | None:
    """`check_out_dir`'s reason to refuse `out`, or None."""
    try:
        check_out_dir(out, resume=resume, new_budget=new_budget, mode=mode)
    except OutDirError as err:
        return str(err)
    return None


def prepare_out_dir(out: Path, *, resume: bool = False, new_budget: bool = False,
                    mode: str = "lora", emit: Callable[[str], None] | None = None,
                    ) -> Path | None:
    """Check `out` (`check_out_dir`, raising `OutDirError`); with `new_budget`, move the
    old federation's state aside (`move_aside`) and say so through `emit`. Return the
    folder it was moved to, or None."""
    check_out_dir(out, resume=resume, new_budget=new_budget, mode=mode)
    moved = move_aside(out) if new_budget else None
    if moved is not None and emit is not None:
        emit(f"[out] --new-budget: the previous simulated silos' ledgers, state and "
             f"checkpoint moved to {moved}/ (kept, not deleted); the new silos start with "
             "fresh budgets")
    return moved
