"""The two things every silo handler shares: refusing loudly, and spending budget.

`refusing` turns a known refusal (budget, liveness, a malformed message, bad input) into
a coded error reply that names it, so the coordinator logs it and the round goes on.
`private_training` is the one place a silo spends privacy budget: calibrate sigma once
per run, check the round against the budget *before* training, train, then append the
signed ledger entry before anything leaves the silo.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pandas as pd
from flwr.app import Context, Error, Message

from silotune.adapters.types import AdapterError
from silotune.client.local import Silo, SiloSource
from silotune.client.silo import SiloPrivacy, SiloPrivacyConfig
from silotune.ml.crosslm import FeedbackRefusedError
from silotune.ml.dp_sgd import DPConfig, LivenessError, sample_rate_for
from silotune.privacy.accounting import AccountingStep, BudgetExhausted
from silotune.protocol import keys as P

log = logging.getLogger(__name__)
T = TypeVar("T")

REFUSALS = (BudgetExhausted, LivenessError, AdapterError, FeedbackRefusedError, ValueError)


class RoundAlreadyTrainedError(RuntimeError):
    """The silo's ledger already holds this round, and its reply was not kept."""


def refusing(source: SiloSource, what: str,
             handle: Callable[[Message, Context, Silo], Message],
             ) -> Callable[[Message, Context], Message]:
    """`handle` for the silo `source` gives, answering a refusal with an error reply."""
    def handler(msg: Message, context: Context) -> Message:
        silo = source(context)
        try:
            return handle(msg, context, silo)
        except (*REFUSALS, RoundAlreadyTrainedError) as err:
            log.warning("%s refused to %s: %s", silo.silo_id, what, err)
            return Message(Error(code=P.ERROR_REFUSED, reason=f"{type(err).__name__}: {err}"),
                           reply_to=msg)
    return handler


@dataclass(frozen=True)
class Spent:
    """What a private training spent: the ledger's cumulative epsilon and its head."""

    epsilon: float
    delta: float
    epsilon_limit: float
    ledger_head: str


def private_training(silo: Silo, privacy: SiloPrivacyConfig, *, federation: str,
                     round_: int, num_examples: int, batch_size: int, steps: int,
                     planned_steps: int, frame: pd.DataFrame,
                     train: Callable[[DPConfig], tuple[T, float]],
                     ) -> tuple[T, Spent]:
    """Run `train(dp)` (returning its result and the liveness of the weights) under the
    silo's budget and record the spend; raises `BudgetExhausted` before any training."""
    budget = SiloPrivacy(privacy)
    q = sample_rate_for(num_examples, batch_size)
    sigma = budget.noise_multiplier(federation, q, planned_steps)
    step = AccountingStep(noise_multiplier=sigma, sample_rate=q, steps=steps)
    budget.check_round(step)  # refuse before any training
    noise_seed = silo.noise_seed(round_)
    result, liveness = train(DPConfig(noise_multiplier=sigma,
                                      max_grad_norm=privacy.max_grad_norm,
                                      noise_seed=noise_seed))
    report, entry = budget.record_round(
        step=step, run_id=federation, round_=round_, frame=frame, liveness=liveness,
        noise="os" if noise_seed is None else "seeded")
    return result, Spent(report.epsilon, privacy.delta, privacy.target_epsilon,
                         str(entry["entry_hash"]))


def spent_fields(spent: Spent | None) -> dict[str, Any]:
    """The manifest's privacy fields of a reply (none for a non-private training)."""
    if spent is None:
        return {}
    return {"epsilon": spent.epsilon, "delta": spent.delta,
            "epsilon_limit": spent.epsilon_limit, "ledger_head": spent.ledger_head}
