"""Empirical one-run audit of a silo's DP-SGD pipeline with Dirac gradient canaries.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023
(arXiv 2305.08846), white-box setting (§6.2, following Nasr et al. 2023, arXiv
2302.07956): each of ``m`` canaries is a *gradient*, not an input. Canary i is a Dirac
vector, zero except ``sign_i * C`` at one coordinate ``c_i`` of the trainable LoRA
parameters (``C`` = the clipping norm, so clipping leaves it as it is). It is inserted
with probability 1/2 (secret bit ``S_i``); an inserted canary behaves as one more record
of the silo: at every logical DP-SGD step it is Poisson-sampled with the silo's sample
rate ``q`` and, when sampled, added to the clipped gradient sum *before* the Gaussian
noise, so the run is exactly the audited mechanism (sigma, q, T) with one more privacy
unit per inserted canary. The canary coordinates are reserved: the data's clipped gradient
sum is zeroed there before the noise, so a coordinate moves only by its canary and the
noise. Zeroing coordinates of a clipped sum keeps every example's contribution within
norm ``C``, so the mechanism and its accounting are unchanged; without it, the real
gradients on a coordinate drowned a single canary in a probe on the tiny test model
(AUC 0.76 at sigma 0). The score of canary i is the movement of its coordinate in the
descent direction, ``-sign_i * (theta_T[c_i] - theta_0[c_i])``; the bound comes from
:func:`silotune.privacy.one_run_audit.audit_from_scores`.

Why gradient canaries: input canaries on a small LoRA barely move their own loss even
without noise (a probe with random-label and out-of-vocabulary canaries gave AUC 0.49),
so the audit had no power. A Dirac canary audits the DP-SGD mechanism itself (clipping,
sampling, noise, accounting) and with sigma = 0 separates inserted canaries almost
perfectly. Training is ``silotune.ml.train.train_local`` itself (same model, LoRA,
Opacus optimizer, Poisson loader, AdamW); the canaries enter through its optimizer hook.

Controls (docs/privacy.md §5): noise off gives a bound clearly above 0 (power), DP on
gives a bound below the accounted epsilon (soundness), and canaries drawn but never
inserted (``insert=False``) give 0.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from opacus.optimizers import DPOptimizer

from silotune.config import RunConfig
from silotune.ml.dp_sgd import DPConfig
from silotune.ml.lm import EncodedExample
from silotune.ml.train import LocalTrainConfig, train_local
from silotune.privacy.accounting import AccountingStep, compute_epsilon
from silotune.privacy.fingerprint import dataset_fingerprint
from silotune.privacy.ledger import Ledger, load_or_create_signing_key
from silotune.privacy.one_run_audit import (
    AuditResult,
    audit_from_scores,
    default_k_grid,
    draw_inclusion,
    seed_commitment,
)

METHOD = "one-run white-box Dirac gradient canaries (Steinke, Nasr, Jagielski 2023)"


class DiracCanaries:
    """Optimizer hook that inserts Dirac gradient canaries into Opacus DP-SGD.

    Parameters
    ----------
    included : np.ndarray
        Shape ``(m,)``, bool: the secret inclusion bits ``S_i``.
    rng : np.random.Generator
        Secret randomness for the canary coordinates, signs and their Poisson sampling.
    insert : bool, default True
        False: the canaries are drawn and scored but never inserted (negative control).
    """

    def __init__(self, included: np.ndarray, rng: np.random.Generator,
                 insert: bool = True) -> None:
        self.included = np.asarray(included, dtype=bool)
        self.m = int(self.included.size)
        self.rng = rng
        self.insert = insert
        self.inserted_steps = 0  # canary gradients actually added (over all steps)
        self._params: list[torch.Tensor] = []
        self._where: list[tuple[int, int]] = []  # canary i -> (param index, flat index)
        self._signs = np.zeros(0)
        self._start = np.zeros(0)

    def attach(self, optimizer: DPOptimizer, sample_rate: float) -> None:
        """Pick the canary coordinates and wrap ``optimizer.add_noise`` to insert them."""
        self._params = list(optimizer.params)
        sizes = [p.numel() for p in self._params]
        total = int(sum(sizes))
        if self.m > total:
            raise ValueError(f"{self.m} canaries need {self.m} distinct coordinates but the "
                             f"adapter has only {total} trainable parameters; use fewer "
                             "canaries or a larger LoRA rank / more target modules")
        coords = self.rng.choice(total, size=self.m, replace=False)  # (m,)
        offsets = np.cumsum([0, *sizes])
        owner = np.searchsorted(offsets, coords, side="right") - 1
        self._where = [(int(j), int(c - offsets[j])) for j, c in zip(owner, coords, strict=True)]
        self._signs = self.rng.choice(np.array([-1.0, 1.0]), size=self.m)
        self._start = self._values()
        magnitude = float(optimizer.max_grad_norm)  # a Dirac of norm C: clipping is a no-op
        add_noise = optimizer.add_noise

        def add_canaries_then_noise() -> None:
            # Called once per logical step, after the real examples are clipped and summed.
            sampled = self.included & (self.rng.random(self.m) < sample_rate)
            for i, (j, k) in enumerate(self._where):
                summed = self._params[j].summed_grad.view(-1)  # type: ignore[attr-defined]
                summed[k] = 0.0  # reserved coordinate: the data's clipped sum stays out
                if self.insert and sampled[i]:
                    summed[k] = self._signs[i] * magnitude  # in place, before the noise
                    self.inserted_steps += 1
            add_noise()

        optimizer.add_noise = add_canaries_then_noise

    def _values(self) -> np.ndarray:
        with torch.no_grad():
            return np.array([float(self._params[j].view(-1)[k]) for j, k in self._where])

    def scores(self) -> np.ndarray:
        """Shape ``(m,)``: movement of each canary coordinate in its descent direction."""
        if not self._where:
            raise RuntimeError("the canaries were never attached to a DP optimizer")
        return -self._signs * (self._values() - self._start)


@dataclass(frozen=True)
class EmpiricalAudit:
    """One empirical audit: the bound and what it was measured on.

    ``eps_accounted`` is the PRV epsilon of the audited run alone (sigma, q, steps), or
    None with ``noise_multiplier == 0`` (no DP: the positive control). ``sound`` is
    ``eps_lower_bound <= eps_accounted`` (always True without DP).
    """

    result: AuditResult
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    eps_accounted: float | None
    inserted: bool
    inserted_canaries: int
    canary_seed_commitment: str
    scores_sha256: str
    k_grid_size: int

    @property
    def sound(self) -> bool:
        return self.eps_accounted is None or \
            self.result.eps_lower_bound <= self.eps_accounted + 1e-9

    def ledger_body(self, silo_id: str, dataset_fingerprint: str,
                    dataset_size: int) -> dict[str, Any]:
        """The ``type = "audit"`` ledger entry (fields of docs/privacy.md §5)."""
        r = self.result
        return {
            "type": "audit", "silo_id": silo_id, "method": METHOD,
            "dataset_fingerprint": dataset_fingerprint, "dataset_size": dataset_size,
            "m": r.m, "r": r.r, "v": r.v, "k_pos": r.k_pos, "k_neg": r.k_neg,
            "k_grid_size": self.k_grid_size, "significance": r.significance,
            "delta": r.delta, "eps_lower_bound": r.eps_lower_bound,
            "eps_accounted": self.eps_accounted, "sound": self.sound,
            "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate, "steps": self.steps,
            "canaries_inserted": self.inserted, "inserted_canaries": self.inserted_canaries,
            "auc": r.auc, "tpr_at_fpr": dict(r.tpr_at_fpr),
            "canary_seed_commitment": self.canary_seed_commitment,
            "scores_sha256": self.scores_sha256,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.result), "eps_accounted": self.eps_accounted,
                "sound": self.sound, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": self.steps,
                "canaries_inserted": self.inserted, "inserted_canaries": self.inserted_canaries}


def empirical_audit(base: torch.nn.Module, examples: Sequence[EncodedExample], pad_id: int,
                    cfg: LocalTrainConfig, dp: DPConfig, *, canaries: int, delta: float,
                    significance: float = 0.05, insert: bool = True,
                    seed: bytes | None = None) -> EmpiricalAudit:
    """Train once with ``canaries`` Dirac gradient canaries and bound epsilon from below.

    Parameters
    ----------
    base, examples, pad_id, cfg, dp
        Exactly what the silo passes to ``train_local`` (``dp.noise_multiplier`` 0 is
        allowed: the positive control, not private).
    canaries : int
        m, the number of canaries (at most the number of trainable LoRA parameters).
    delta, significance
        The delta of the DP claim under test and the audit's significance level.
    insert : bool, default True
        False: draw and score the canaries but insert none (negative control: bound 0).
    seed : bytes, optional
        Secret canary seed (>= 16 bytes); default ``secrets.token_bytes(32)``. Only its
        SHA-256 commitment is recorded.
    """
    seed = secrets.token_bytes(32) if seed is None else seed
    if len(seed) < 16:
        raise ValueError("the canary seed must have at least 16 bytes")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest(), "big"))
    included = draw_inclusion(canaries, rng)
    hook = DiracCanaries(included, rng, insert=insert)
    trained = train_local(base, examples, pad_id, cfg, dp, hook=hook)
    scores = hook.scores()
    result = audit_from_scores(scores, included, delta=delta, significance=significance)
    eps = None
    if dp.noise_multiplier > 0:
        step = AccountingStep(dp.noise_multiplier, trained.sample_rate, trained.steps)
        eps = compute_epsilon([step], delta, cross_check=False).epsilon
    return EmpiricalAudit(
        result=result, noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
        sample_rate=trained.sample_rate, steps=trained.steps, eps_accounted=eps,
        inserted=insert, inserted_canaries=int(included.sum()) if insert else 0,
        canary_seed_commitment=seed_commitment(seed),
        scores_sha256=hashlib.sha256(np.ascontiguousarray(scores, "<f8").tobytes()).hexdigest(),
        k_grid_size=len(default_k_grid(canaries)))


@dataclass(frozen=True)
class SiloAuditSpec:
    """What ``silotune audit --empirical`` trains: the silo's data and DP-SGD settings.

    ``noise_multiplier``/``max_grad_norm`` None: taken from the ledger's last train entry.
    """

    silo_index: int = 0
    canaries: int = 1000
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    steps: int = 20
    insert: bool = True
    significance: float = 0.05


def _last_train(ledger_entries: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    return next((e for e in reversed(ledger_entries) if e.get("type") == "train"), None)


def open_audit_ledger(run: RunConfig, spec: SiloAuditSpec, ledger_path: Path,
                      key_path: Path) -> tuple[Ledger, float, float]:
    """The silo's ledger, opened with the silo's own signing key, and the audit's
    ``(noise_multiplier, max_grad_norm)``: the spec's, else the ledger's last train entry
    (clip: else ``run.max_grad_norm``). Raises ValueError without the key or a sigma."""
    key_path, ledger_path = Path(key_path), Path(ledger_path)
    if not key_path.is_file():
        raise ValueError(f"signing key {key_path} not found: the audit entry must be signed "
                         "with the silo's own ledger key (OUT/silos/<silo>/"
                         "ledger-signing-key.pem)")
    ledger = Ledger(ledger_path, load_or_create_signing_key(key_path))
    last = _last_train(ledger.entries()) or {}
    sigma = spec.noise_multiplier if spec.noise_multiplier is not None \
        else last.get("noise_multiplier")
    clip = spec.max_grad_norm if spec.max_grad_norm is not None \
        else last.get("max_grad_norm", run.max_grad_norm)
    if sigma is None:
        raise ValueError(f"{ledger_path} has no train entry to take the noise multiplier "
                         "from; pass --noise-multiplier")
    return ledger, float(sigma), float(clip)


def audit_silo(run: RunConfig, spec: SiloAuditSpec, frame: pd.DataFrame, silo_id: str,
               ledger_path: Path, key_path: Path) -> tuple[EmpiricalAudit, dict[str, Any]]:
    """Run the empirical audit on one silo's data and append the signed ``audit`` entry to
    the silo's ledger with the silo's existing signing key. Returns ``(audit, entry)``.

    Parameters
    ----------
    run : RunConfig
        Model, LoRA, batch and learning-rate settings, and the delta under test; the LoRA
        rank is ``run.rank_of(spec.silo_index)``.
    spec : SiloAuditSpec
        Canaries, steps, controls; sigma and clip default to the ledger's last train entry.
    frame : pandas.DataFrame
        The silo's training rows (columns ``text`` and ``label``), as the silo trains on
        them (a simulated silo's: :func:`silotune.simulations.audit.audit_simulated_silo`).
    silo_id : str
        The silo's id, recorded in the entry.
    ledger_path, key_path
        The silo's ledger and its ledger signing key (which must exist).
    """
    from silotune.ml.assets import resolve_model
    from silotune.ml.lm import encode, load_model
    from silotune.ml.targets import resolve_targets

    ledger, sigma, clip = open_audit_ledger(run, spec, ledger_path, key_path)
    model, tok = load_model(resolve_model(run.model))
    examples = [encode(tok, t, lab) for t, lab in zip(frame["text"], frame["label"],
                                                          strict=True)]
    rank = run.rank_of(spec.silo_index)
    cfg = LocalTrainConfig(rank=rank, alpha=run.lora_alpha_per_rank * rank,
                           targets=resolve_targets(model, run.lora_targets),
                           local_steps=spec.steps,
                           batch_size=run.batch_size,
                           physical_batch_size=run.physical_batch_size,
                           learning_rate=run.learning_rate, init_seed=run.seed)
    audit = empirical_audit(model, examples, int(tok.pad_token_id), cfg,
                            DPConfig(sigma, clip), canaries=spec.canaries,
                            delta=run.target_delta, significance=spec.significance,
                            insert=spec.insert)
    body = audit.ledger_body(silo_id, dataset_fingerprint(frame), len(frame))
    return audit, ledger.append(body)
