"""Auditing silo privacy ledgers: the engine behind ``silotune audit``.

An auditor (or a data protection officer) receives a silo's JSONL ledger and, ideally, the
silo's Ed25519 public key. ``audit_ledger`` runs ``verify_ledger`` (seq order, hash chain,
entry hashes, signatures, epsilon recomputed per train entry, epsilon never decreasing and
never above its limit, histories only growing), checks that one key signed the whole
ledger, and recomputes the final cumulative epsilon *now* from the last train entry's
``accounting_history`` with Google ``dp_accounting`` (PLD and RDP) as an independent
cross-check of the reported value (docs/privacy.md §3, §6):

* accountant ``prv``: ``|eps - eps_pld| <= max(2 % of eps_pld, 0.02)``. PRV (eps_error
  0.01) and PLD (discretization 1e-4) are both near-tight upper bounds; the 0.02 floor
  keeps the two accountants' own errors from failing small epsilons (0.0455 vs 0.0354 at
  sigma 3, q 0.01, 10 steps).
* accountant ``rdp`` (PRV failed): ``eps_pld - 1e-6 <= eps <= eps_rdp (1 + 1e-6)``: the
  reported RDP bound equals a fresh RDP bound and is not below the tight PLD bound.

CrossLM ``feedback`` entries (score releases) are checked by ``verify_ledger`` through
``silotune.privacy.feedback.check_feedback_entry``: scores only, epsilon_cost exactly 0,
made by the latest DP-trained model, whose cumulative epsilon they repeat.

Only the final cumulative value is cross-checked with PLD (about 0.5 s per ledger);
every entry is already recomputed with PRV/RDP by ``verify_ledger``.

A ledger cannot show a truncated tail or a rollback: ``heads`` checks it against the
heads its coordinator recorded (`silotune.privacy.recorded_heads`); the verdict names the
key trusted, and ``strict`` fails one not pinned (docs/privacy.md §6).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from silotune.files import atomic_write_bytes
from silotune.privacy.accounting import AccountingStep, compute_epsilon
from silotune.privacy.ledger import ACCOUNTED, key_id, read_entries, verify_ledger
from silotune.privacy.recorded_heads import (
    KEY_SEQ0,
    PINNED_SOURCES,
    RecordedHeads,
    against_heads,
)

PLD_REL_TOL = 0.02  # reported PRV epsilon vs independent PLD: within 2 % ...
PLD_ABS_TOL = 0.02  # ... or within 0.02 for small epsilons (accountants' own error)
_ORDER_TOL = 1e-6


class KeyFileError(ValueError):
    """A public or private key file is missing, unreadable or not an Ed25519 key."""




@dataclass(frozen=True)
class LedgerAudit:
    """Result of auditing one ledger file.

    ``epsilon``/``epsilon_limit``/``delta``/``accountant`` come from the last train entry
    (None when there is none); ``independent`` holds ``{"pld", "rdp"}`` recomputed now from
    its ``accounting_history``; ``history`` is ``[(round, epsilon)]`` per train entry, with
    rounds of later runs shifted to follow earlier ones; ``problems`` each read
    ``"seq N: field: what is wrong"`` (or a file-level message); ``ok`` is ``not problems``.
    """

    path: Path
    silo_id: str | None
    entries: int
    train_entries: int
    epsilon: float | None
    epsilon_limit: float | None
    delta: float | None
    accountant: str | None
    independent: dict[str, float]
    problems: list[str]
    history: list[tuple[int, float]]
    ok: bool
    signer_key_id: str | None = None
    cross_check_ok: bool | None = field(default=None)
    feedback_entries: int = 0  # CrossLM score releases (0 epsilon, checked by verify_ledger)
    # Empirical one-run audits: {"seq", "m", "eps_lower_bound", "eps_accounted", "sound"}.
    empirical: list[dict[str, Any]] = field(default_factory=list)
    unit: str = "example"  # "silo" for the coordinator's client-level ledger
    # Train entries whose DP noise came from a simulation's public seed (reproducible, so
    # the guarantee holds only against whoever does not know that seed).
    seeded_noise_entries: int = 0
    key_source: str = KEY_SEQ0  # which key the audit trusted (KEY_*)
    heads_checked: int = 0  # coordinator-recorded heads found in the ledger (--heads)

    @property
    def pinned(self) -> bool:  # the signer key pinned at enrolment or by the auditor
        return self.key_source in PINNED_SOURCES

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers become None; safe with ``allow_nan=False``)."""
        return {
            "path": str(self.path), "silo_id": self.silo_id, "ok": self.ok,
            "entries": self.entries, "train_entries": self.train_entries,
            "feedback_entries": self.feedback_entries,
            "epsilon": _finite(self.epsilon), "epsilon_limit": _finite(self.epsilon_limit),
            "delta": _finite(self.delta), "accountant": self.accountant,
            "independent": {k: _finite(v) for k, v in self.independent.items()},
            "cross_check_ok": self.cross_check_ok, "signer_key_id": self.signer_key_id,
            "problems": list(self.problems),
            "history": [[r, _finite(e)] for r, e in self.history],
            "empirical": list(self.empirical), "privacy_unit": self.unit,
            "seeded_noise_entries": self.seeded_noise_entries,
            "key_source": self.key_source, "key_pinned": self.pinned,
            "heads_checked": self.heads_checked,
        }


def _finite(value: Any) -> float | None:
    """``float(value)`` if it is a finite real number (not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


# ----------------------------------------------------------------------------- keys

def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """Read an Ed25519 public key: PEM (SubjectPublicKeyInfo) or the raw 32-byte key as hex
    (an entry's ``signer_public_key``). Raises ``KeyFileError`` saying what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read public key {path}: {exc.strerror or exc}") from exc
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        if b"PRIVATE KEY" in text:
            raise KeyFileError(f"{path} is a PRIVATE key; give the auditor only the public key "
                               "(silotune.privacy.audit.export_public_key)")
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as exc:
            raise KeyFileError(f"{path}: not a readable PEM public key ({exc})") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
        return key
    try:
        raw = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raw = b""
    if len(raw) != 32:
        raise KeyFileError(f"{path}: not an Ed25519 public key: expected a PEM public key or "
                           "64 hex characters (an entry's signer_public_key)")
    return Ed25519PublicKey.from_public_bytes(raw)


def export_public_key(key_path: Path | str, out_path: Path | str) -> Path:
    """Write the public half of the silo's Ed25519 private key (PKCS#8 PEM at ``key_path``,
    as made by ``load_or_create_signing_key``) to ``out_path`` as a PEM SubjectPublicKeyInfo,
    for auditors. Never creates a key; raises ``KeyFileError`` if it cannot be read."""
    key_path, out_path = Path(key_path), Path(out_path)
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {key_path}: {exc.strerror or exc}") from exc
    except (TypeError, ValueError) as exc:
        raise KeyFileError(f"{key_path}: not a readable unencrypted PEM private key ({exc})") \
            from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{key_path}: not an Ed25519 private key ({type(key).__name__})")
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(out_path, pem)
    return out_path


# --------------------------------------------------------------------------- checks

def independent_check(history: Sequence[AccountingStep], delta: float, epsilon: float,
                      accountant: str) -> tuple[dict[str, float], str | None]:
    """Recompute ``{"pld", "rdp"}`` from ``history`` with dp_accounting and compare them with
    the reported cumulative ``epsilon``; return ``(values, problem or None)``. The problem
    text starts with the field (``epsilon`` or ``accountant``), not the seq."""
    checks = compute_epsilon(history, delta, cross_check=True).cross_check
    values = {"pld": float(checks["pld"]), "rdp": float(checks["rdp"])}
    pld, rdp = values["pld"], values["rdp"]
    if accountant == "prv":
        tol = max(PLD_REL_TOL * pld, PLD_ABS_TOL)
        if not abs(epsilon - pld) <= tol:
            side = "below" if epsilon < pld else "above"
            return values, (f"epsilon: reported PRV epsilon {epsilon:.6g} is {side} the "
                            f"independent dp_accounting PLD epsilon {pld:.6g} by more than "
                            f"{PLD_REL_TOL:.0%} (difference {abs(epsilon - pld):.4g}, "
                            f"tolerance {tol:.4g})")
    elif accountant == "rdp":
        if epsilon > rdp * (1 + _ORDER_TOL) + 1e-12:
            return values, (f"epsilon: reported RDP epsilon {epsilon:.6g} exceeds the "
                            f"independent dp_accounting RDP epsilon {rdp:.6g}")
        if epsilon < pld - _ORDER_TOL:
            return values, (f"epsilon: reported RDP epsilon {epsilon:.6g} is below the "
                            f"independent dp_accounting PLD epsilon {pld:.6g} (under-reported)")
    else:
        return values, f"accountant: unknown accountant {accountant!r} (expected prv or rdp)"
    return values, None


def _label(entry: dict[str, Any], index: int) -> str:
    return f"seq {entry.get('seq', f'? (line {index + 1})')}"


def _plot_history(train: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(round, epsilon) per train entry; a new run's rounds continue after the last one."""
    out: list[tuple[int, float]] = []
    offset, last_x, run = 0, 0, object()
    for e in train:
        eps = _finite(e.get("epsilon"))
        if eps is None:
            continue
        rnd = e.get("round")
        if e.get("run_id") != run:
            run, offset = e.get("run_id"), last_x
        if isinstance(rnd, int) and not isinstance(rnd, bool) and rnd + offset > last_x:
            x = rnd + offset
        else:
            x = last_x + 1
        out.append((x, eps))
        last_x = x
    return out


def audit_ledger(path: Path | str, public_key: Ed25519PublicKey | None = None, *,
                 heads: Mapping[str, RecordedHeads] | None = None,
                 strict: bool = False) -> LedgerAudit:
    """Audit one ledger file (see the module doc for what is checked). `heads`: what the
    coordinator recorded per silo (`load_heads`); `strict`: an unpinned key fails."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "not found"
        return LedgerAudit(path=path, silo_id=None, entries=0, train_entries=0, epsilon=None,
                           epsilon_limit=None, delta=None, accountant=None, independent={},
                           problems=[f"ledger file {what}"], history=[], ok=False)
    read_problem: list[str] = []
    try:
        entries = read_entries(path, skip_bad=True)
    except OSError as exc:
        entries, read_problem = [], [f"cannot read ledger: {exc.strerror or exc}"]
    silo_id = next((str(e["silo_id"]) for e in reversed(entries) if "silo_id" in e), None)
    public_key, key_source, head_problems, checked = against_heads(
        entries, silo_id or path.stem, public_key, heads)
    prefix = f"{path}: "
    problems = [p.removeprefix(prefix) for p in verify_ledger(path, public_key)]
    problems += read_problem + head_problems
    if strict and key_source not in PINNED_SOURCES:
        problems.append(f"key: {key_source}; --strict needs a key pinned at enrolment "
                        "(--heads with a registered --ledger-key) or given (--public-key)")
    if not entries and not problems:
        problems.append("ledger has no entries (an emptied ledger cannot be told from a new one; "
                        "compare with its published head hash)")

    signer_id = None
    if entries:
        first = entries[0].get("signer_public_key")
        try:
            signer_id = key_id(Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(first))))
        except ValueError:
            signer_id = None
        if public_key is None and signer_id is not None:
            for i, e in enumerate(entries[1:], start=1):
                if e.get("signer_public_key") != first:
                    problems.append(f"{_label(e, i)}: signer_public_key: signed by a different "
                                    f"key than seq 0 (key {signer_id}); no key rotation entry "
                                    "exists, so this entry was not written by this silo")

    train = [(i, e) for i, e in enumerate(entries) if e.get("type") in ACCOUNTED]
    epsilon = limit = delta = None
    accountant: str | None = None
    independent: dict[str, float] = {}
    cross_ok: bool | None = None
    if train:
        i, last = train[-1]
        epsilon, limit = _finite(last.get("epsilon")), _finite(last.get("epsilon_limit"))
        delta = _finite(last.get("delta"))
        accountant = str(last["accountant"]) if "accountant" in last else None
        try:
            history = [AccountingStep.from_dict(d) for d in last["accounting_history"]]
            if epsilon is None or delta is None or accountant is None:
                raise ValueError("epsilon, delta or accountant missing or not a number")
            independent, problem = independent_check(history, delta, epsilon, accountant)
        except (KeyError, TypeError, ValueError) as exc:
            problem = f"accounting_history: cannot recompute epsilon independently ({exc})"
        cross_ok = problem is None
        if problem:
            problems.append(f"{_label(last, i)}: {problem}")
    client = [e for e in entries if e.get("type") == "client_level"]
    unit = "example"
    if client and not train:  # the coordinator's ledger: client-level DP, unit = silo
        unit, silo_id = "silo", "client-level"
        epsilon, delta = _finite(client[-1].get("epsilon")), _finite(client[-1].get("delta"))
        accountant = str(client[-1].get("accountant"))
        independent = {k: float(v) for k, v in dict(client[-1].get("eps_cross_check") or {})
                       .items() if _finite(v) is not None}
    empirical = [{"seq": e.get("seq"), "m": e.get("m"),
                  "eps_lower_bound": _finite(e.get("eps_lower_bound")),
                  "eps_accounted": _finite(e.get("eps_accounted")), "sound": e.get("sound")}
                 for e in entries if e.get("type") == "audit"]
    return LedgerAudit(path=path, silo_id=silo_id, entries=len(entries),
                       train_entries=len(train), epsilon=epsilon, epsilon_limit=limit,
                       delta=delta, accountant=accountant, independent=independent,
                       problems=problems, history=_plot_history([e for _, e in train]),
                       ok=not problems, signer_key_id=signer_id, cross_check_ok=cross_ok,
                       feedback_entries=sum(e.get("type") == "feedback" for e in entries),
                       empirical=empirical, unit=unit,
                       seeded_noise_entries=sum(e.get("noise_seed_source") == "seeded"
                                                for _, e in train),
                       key_source=key_source,
                       heads_checked=checked)


# --------------------------------------------------------------------------- output

def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def format_table(audits: Sequence[LedgerAudit]) -> str:
    """Per-ledger table (silo, entries, epsilon / limit, delta, accountant, PLD check,
    status), then one line per problem: ``FILE: seq N: field: what is wrong``."""
    header = ("silo", "entries", "epsilon / limit", "delta", "accountant", "PLD check",
              "key", "status")
    rows = []
    for a in audits:
        pld = a.independent.get("pld")
        if a.cross_check_ok is None:
            check = "-"
        else:
            check = f"{'ok' if a.cross_check_ok else 'FAILED'}" + \
                (f" (PLD {pld:.4f})" if pld is not None else "")
        rows.append((a.silo_id or a.path.stem,
                     f"{a.entries} ({a.train_entries} train"
                     + (f", {a.feedback_entries} feedback)" if a.feedback_entries else ")")
                     if a.entries else "0",
                     f"{_fmt(a.epsilon)} / {_fmt(a.epsilon_limit, 'g')}",
                     _fmt(a.delta, "g"), a.accountant or "-", check,
                     "pinned" if a.pinned else "NOT pinned", "OK" if a.ok else "FAILED"))
    widths = [max(len(r[c]) for r in (header, *rows)) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in (header, *rows)]
    for a in audits:
        lines.append(f"{a.silo_id or a.path.stem}: signer key {a.signer_key_id or '-'} "
                     f"{a.key_source}; {a.heads_checked} coordinator-recorded head(s) checked")
        if a.unit == "silo":
            lines.append(f"{a.path.name}: client-level DP, unit = one silo (a separate "
                         "guarantee from the silos' record-level epsilon)")
        if a.seeded_noise_entries:
            lines.append(f"{a.silo_id or a.path.stem}: {a.seeded_noise_entries} train "
                         "entries used seeded DP noise (a simulation's dp-noise-seed): "
                         "reproducible, not private against anyone who knows the seed")
        for e in a.empirical:
            acc = "no DP" if e["eps_accounted"] is None else f"{e['eps_accounted']:.4f}"
            lines.append(f"{a.silo_id or a.path.stem}: empirical audit seq {e['seq']}: "
                         f"lower bound {_fmt(e['eps_lower_bound'])} (m={e['m']}), accounted "
                         f"{acc}")
    problems = [f"  {a.path}: {p}" for a in audits for p in a.problems]
    if problems:
        lines += ["", f"problems ({len(problems)}):", *problems]
    ok = sum(a.ok for a in audits)
    lines += ["", f"{ok} of {len(audits)} ledger(s) OK"]
    return "\n".join(lines)


def plot_epsilon(audits: Sequence[LedgerAudit], file: Path | str) -> Path:
    """PNG of cumulative epsilon per round for each silo, its limit as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4), layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for n, a in enumerate(audits):
        color = f"C{n % 10}"
        name = (a.silo_id or a.path.stem) + ("" if a.ok else " (FAILED)")
        if a.history:
            xs, ys = zip(*a.history, strict=True)
            ax.plot(xs, ys, marker="o", color=color, label=name)
        if a.epsilon_limit is not None:
            ax.axhline(a.epsilon_limit, color=color, linestyle="--", linewidth=1,
                       label=f"{name} limit")
    ax.set_xlabel("training round (later runs continue the count)")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title("Privacy budget spent per silo")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    file = Path(file)
    fig.savefig(file, format="png", dpi=100)
    return file
