"""Client-level DP (unit = one silo's whole data) for many-silo federations.

DP-FedAvg with server-side fixed clipping: McMahan, Ramage, Talwar & Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018 (arXiv 1710.06963), as in
Flower's ``DifferentialPrivacyServerSideFixedClipping`` (``flwr.serverapp.strategy``):
clip every silo's model update to L2 norm ``C``, aggregate with equal weights, add
Gaussian noise of standard deviation ``z C / k`` to the mean of the k sampled silos. Flower's
wrapper needs Flower's ``Strategy.start`` and equal-shape arrays; silotune's round loop
and heterogeneous ranks need neither, so :class:`ClientLevelDP` applies the same math as a
wrapper around an :class:`~silotune.adapters.types.AggregationRule`.

**What is clipped and where the noise goes (FLoRA).** A silo's update is the change of
the model, ``Delta_k = s_k B_k A_k`` per adapted module (FLoRA starts every silo at
``B = 0``). We clip the product: ``||Delta_k||_F`` over all modules, computed from the
factors as ``sqrt(sum trace((B^T B)(A A^T)))`` without forming it, and scale ``B_k`` by
``min(1, C / ||Delta_k||)``. Clipping the factors instead bounds nothing useful:
``(t B)(A / t)`` is the same update for every t, and the aggregate that reaches the model
is the sum of products. The noise is therefore added to the merged *dense* delta
``sum_k clip(Delta_k)``, whose sensitivity is exactly ``C`` (add or remove one silo).
Releasing FLoRA's stacked factors would publish every silo's own ``B_k, A_k`` next to
the noise, so the coordinator releases only the dense noisy mean, as the factors
``(I, D)`` (or ``(D, I)``) of rank ``min(d_out, d_in)``: the broadcast of a round grows
from ``sum_k r_k (d_in + d_out)`` to about one dense matrix per adapted module, the
price of full-rank noise. Only rules whose round result is a merge that is linear in the
silo updates qualify (``flora``); the others average factors separately (FedIT family)
or truncate an SVD, and their sensitivity is not bounded by ``||Delta_k||``.

**Accounting** (dp_accounting, Mironov 2017 RDP, PLD cross-check). The mean is divided
by the fixed k = silos per round, never by the number of replies, so a missing or
excluded silo cannot change the scale. Each noisy round is one Gaussian mechanism with
noise multiplier z and sensitivity C under add-or-remove-one-silo, and R rounds are R
compositions, whether or not the silo took part. No amplification by sampling is
claimed: the silos of a round are drawn with the run's public seed and published in
``metrics.json``, and amplification needs a secret sample. The count restarts nowhere:
a resumed run continues the release count of the ledger it appends to
(``silotune/server/client_dp.py``). Client-level epsilon is a different guarantee from
the silos' record-level epsilon: never add the two. Nothing else derived from the
updates is published (no count of clipped silos: it would be an un-noised statistic).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from silotune.adapters.types import AdapterError, LoraFactors, LowRankUpdate, SiloAdapter
from silotune.privacy.accounting import PLD_DISCRETIZATION
from silotune.strategies.base import AggregationRule, RoundResult, SiloPlan

SUPPORTED_RULES = ("flora",)
MECHANISM = "DP-FedAvg server-side fixed clipping (McMahan et al. 2018)"
NEIGHBORING_RELATION = "add_or_remove_one_silo"
SAMPLING = "public: no amplification claimed"


@dataclass(frozen=True)
class ClientLevelConfig:
    """Client-level DP settings.

    ``noise_multiplier`` z > 0, ``clip_norm`` C > 0 (Frobenius norm of a silo's whole
    update), ``population`` N silos, ``per_round`` k sampled per round (1 <= k <= N),
    ``delta`` in (0, 1).
    """

    noise_multiplier: float
    clip_norm: float
    population: int
    per_round: int
    delta: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"client-level noise multiplier must be > 0, got "
                             f"{self.noise_multiplier}")
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"client-level clip norm must be > 0, got {self.clip_norm}")
        if not 1 <= self.per_round <= self.population:
            raise ValueError(f"need 1 <= silos per round ({self.per_round}) <= silos "
                             f"({self.population})")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")


def client_level_epsilon(cfg: ClientLevelConfig, releases: int) -> dict[str, float]:
    """Epsilon after ``releases`` noisy rounds: ``{"rdp": ..., "pld": ...}`` (R Gaussian
    compositions, add-or-remove-one-silo, no amplification by sampling)."""
    if releases <= 0:
        return {"rdp": 0.0, "pld": 0.0}
    event = dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(cfg.noise_multiplier),
                                         releases)
    rdp = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=rdp_privacy_accountant.NeighborRel.ADD_OR_REMOVE_ONE)
    pld = pld_privacy_accountant.PLDAccountant(
        value_discretization_interval=PLD_DISCRETIZATION)
    return {"rdp": float(rdp.compose(event).get_epsilon(cfg.delta)),
            "pld": float(pld.compose(event).get_epsilon(cfg.delta))}


def update_norm(adapter: SiloAdapter) -> float:
    """``||s B diag(w) A||_F`` over all modules, from the factors: trace((B^T B)(A A^T))."""
    total = 0.0
    for f in adapter.modules.values():
        a, b = f.A.astype(np.float64), f.weighted_b()  # (r, d_in), (d_out, r)
        total += float(np.sum((b.T @ b) * (a @ a.T)))  # trace(X Y) = sum(X * Y^T), Y sym.
    return abs(adapter.scale) * math.sqrt(max(total, 0.0))


def clip_adapter(adapter: SiloAdapter, clip_norm: float) -> tuple[SiloAdapter, float]:
    """The adapter with B scaled so its update norm is at most ``clip_norm``; equal weight
    (``num_examples = 1``). Returns ``(clipped, norm before clipping)``."""
    norm = update_norm(adapter)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    modules = {m: replace(f, B=f.B.astype(np.float64) * factor)
               for m, f in adapter.modules.items()}
    return replace(adapter, modules=modules, num_examples=1), norm


def dense_factors(delta: np.ndarray) -> LoraFactors:
    """Exact factors of a dense ``delta`` (d_out, d_in): ``B @ A == delta`` with an identity
    on the smaller side (rank ``min(d_out, d_in)``)."""
    d_out, d_in = delta.shape
    if d_in <= d_out:
        return LoraFactors(A=np.eye(d_in), B=delta)  # (d_in, d_in), (d_out, d_in)
    return LoraFactors(A=delta, B=np.eye(d_out))  # (d_out, d_in), (d_out, d_out)


@dataclass
class RoundPrivacy:
    """What one noisy round did: each silo's update norm before clipping (kept on the
    coordinator, never published)."""

    norms: dict[str, float] = field(default_factory=dict)
    releases: int = 0


class ClientLevelDP:
    """Wraps an aggregation rule with DP-FedAvg's clipping and Gaussian noise.

    Parameters
    ----------
    inner : AggregationRule
        The rule to wrap; its name must be in ``SUPPORTED_RULES``.
    cfg : ClientLevelConfig
        z, C, N, k and delta.
    rng : np.random.Generator, optional
        Noise source; default seeded from the OS (``secrets``), never from the run seed.
    releases : int
        Noisy rounds already released about these silos (a resumed run's ledger).
    """

    def __init__(self, inner: AggregationRule, cfg: ClientLevelConfig,
                 rng: np.random.Generator | None = None, releases: int = 0) -> None:
        if inner.name not in SUPPORTED_RULES:
            raise AdapterError(
                f"client-level DP needs a rule whose merge is linear in the silo updates "
                f"({', '.join(SUPPORTED_RULES)}); '{inner.name}' averages factors or "
                "truncates an SVD, so clipping the update does not bound its sensitivity. "
                "Use --strategy flora, or turn client-level DP off")
        self.inner, self.cfg = inner, cfg
        self.name = inner.name
        self.rng = rng or np.random.default_rng(secrets.randbits(128))
        self.last = RoundPrivacy()
        self.releases = releases

    def setup(self, ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]],
              seed: int) -> None:
        self.inner.setup(ranks, shapes, seed)
        self.shapes = dict(shapes)

    def plan(self, silo: str, rank: int, state: LowRankUpdate | None,
             round_: int) -> SiloPlan:
        plan = self.inner.plan(silo, rank, state, round_)
        if plan.init is not None and any(np.any(f.B) for f in plan.init.values()):
            raise AdapterError("client-level DP clips s B A as the silo's update, which "
                               "needs every silo to start from B = 0")
        return plan

    def aggregate(self, adapters: Sequence[SiloAdapter],
                  state: LowRankUpdate | None) -> RoundResult:
        """Clip each update to C, sum, add N(0, (z C)^2) per coordinate, divide by k."""
        clipped, norms = [], {}
        for a in adapters:
            c, norms[a.silo] = clip_adapter(a, self.cfg.clip_norm)
            clipped.append(c)
        total: dict[str, np.ndarray] = {m: np.zeros(s) for m, s in self.shapes.items()}
        if clipped:
            merged = self.inner.aggregate(clipped, state).merge
            if merged is None:
                raise AdapterError(f"'{self.name}' returned no merge to add noise to")
            for m in merged.modules:  # equal weights: the merge is the mean; x n = the sum
                total[m] = merged.dense(m) * len(clipped)
        std = self.cfg.noise_multiplier * self.cfg.clip_norm
        noisy = {m: dense_factors((t + self.rng.normal(0.0, std, size=t.shape))
                                  / self.cfg.per_round)
                 for m, t in sorted(total.items())}
        self.releases += 1
        self.last = RoundPrivacy(norms=norms, releases=self.releases)
        return RoundResult(merge=LowRankUpdate(modules=noisy, scale=1.0))

    def next_rank(self, adapter: SiloAdapter, rank: int) -> int:
        return self.inner.next_rank(adapter, rank)

    def epsilon(self) -> dict[str, float]:
        """Client-level epsilon after the releases so far (``rdp``, and ``pld`` if no
        sampling)."""
        return client_level_epsilon(self.cfg, self.releases)

    def ledger_body(self, round_: int, run_id: str) -> dict[str, Any]:
        """The coordinator's ``type = "client_level"`` ledger entry for this round."""
        eps = self.epsilon()
        cfg = self.cfg
        return {
            "type": "client_level", "run_id": run_id, "round": round_,
            "privacy_unit": "silo", "neighboring_relation": NEIGHBORING_RELATION,
            "mechanism": MECHANISM, "rule": self.name, "sampling": SAMPLING,
            "noise_multiplier": cfg.noise_multiplier, "clip_norm": cfg.clip_norm,
            "population": cfg.population, "per_round": cfg.per_round,
            "releases": self.releases, "delta": cfg.delta,
            "epsilon": eps["rdp"], "accountant": "rdp",
            "eps_cross_check": {k: v for k, v in eps.items() if k != "rdp"},
            "participants": len(self.last.norms),
        }


def check_client_level_entry(entry: Mapping[str, Any],
                             previous: Mapping[str, Any] | None) -> list[str]:
    """Problems with a ``client_level`` ledger entry (``"field: what is wrong"``):
    epsilon recomputed with RDP from (z, N, k, releases, delta); releases counting up by
    one and epsilon never decreasing along the ledger (a resumed run continues the count)."""
    try:
        cfg = ClientLevelConfig(float(entry["noise_multiplier"]), float(entry["clip_norm"]),
                                int(entry["population"]), int(entry["per_round"]),
                                float(entry["delta"]))
        releases, eps = int(entry["releases"]), float(entry["epsilon"])
    except (KeyError, TypeError, ValueError) as exc:
        return [f"client-level fields: missing or invalid ({exc})"]
    problems = []
    recomputed = client_level_epsilon(cfg, releases)["rdp"]
    if not math.isclose(eps, recomputed, rel_tol=1e-6, abs_tol=1e-12):
        problems.append(f"epsilon: stored {eps} but RDP recomputation from (noise_multiplier, "
                        f"population, per_round, releases) gives {recomputed}")
    if previous is not None:
        if releases != int(previous.get("releases", -1)) + 1:
            problems.append(f"releases: {releases} does not follow {previous.get('releases')}"
                            " (a noisy round is missing from the ledger)")
        if eps < float(previous.get("epsilon", 0.0)) - 1e-9:
            problems.append(f"epsilon: eps decreased from {previous.get('epsilon')} to {eps}")
    return problems
