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

import datetime
from pathlib import Path

from silotune.config import ConfigError

# What belongs to one federation of simulated silos, moved aside together by --new-budget.
FEDERATION_STATE = ("ledgers", "silos", "checkpoint")
CHECKPOINT_STATE = Path("checkpoint") / "state.json"  # silotune/server/checkpoint.py


class OutDirError(ConfigError):
    """The output folder holds another simulation's silos (see the module docstring)."""


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
        raise OutDirError("--resume: CrossLM runs cannot be resumed; use --new-budget "
                          "(the old silos move aside) or another --out folder")
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


def prepare_out_dir(out: Path, *, resume: bool = False, new_budget: bool = False,
                    mode: str = "lora") -> Path | None:
    """Check `out` (`check_out_dir`); with `new_budget`, move the old federation's state
    aside (`move_aside`). Return the folder it was moved to, or None."""
    check_out_dir(out, resume=resume, new_budget=new_budget, mode=mode)
    return move_aside(out) if new_budget else None
