"""The two things every silo handler shares: refusing loudly, and spending budget.

`refusing` turns a known refusal (policy, budget, liveness, a malformed message, bad
input) into a coded error reply, so the coordinator logs it and the round goes on. The
reason carries no local fact (paths, host names, raw text of private data): refusals of
the silo's own making say what was refused; anything else is reported by its kind and a
reference into the silo's own log.

`private_training` is the one place a silo spends privacy budget, under one lock on its
state directory (held across processes): calibrate sigma once per run, refuse useless or
over-budget training, append the signed ledger entry (write-ahead), then train, and
report the ledger entries since the head the coordinator acknowledged. Its
callers check the request against the silo's policy before they read the data. A
training that fails after it touched the data replies that its spend is recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from flwr.app import Context, Error, Message

from silotune.client.history import MissingRoundsError
from silotune.client.local import Silo, SiloSource
from silotune.client.policy import PolicyRefusalError, check_useful
from silotune.client.silo import SiloPrivacy, SiloPrivacyConfig
from silotune.ml.crosslm import FeedbackRefusedError
from silotune.ml.dp_sgd import DPConfig, LivenessError, sample_rate_for
from silotune.privacy.accounting import AccountingStep, BudgetExhausted
from silotune.privacy.ledger import chain_links
from silotune.protocol import keys as P
from silotune.protocol.messages import MessageError

log = logging.getLogger(__name__)
T = TypeVar("T")


class RoundAlreadyTrainedError(RuntimeError):
    """The silo's ledger already holds this round, and its reply was not kept."""


class SpentButFailedError(RuntimeError):
    """Training failed after it touched the data; its spend is in the ledger."""


# Refusals whose text the silo wrote itself (no local facts): sent as they are.
_OWN = (PolicyRefusalError, BudgetExhausted, LivenessError, FeedbackRefusedError, MessageError,
        RoundAlreadyTrainedError, SpentButFailedError)


def refusing(source: SiloSource, what: str,
             handle: Callable[[Message, Context, Silo], Message],
             ) -> Callable[[Message, Context], Message]:
    """`handle` for the silo `source` gives, answering a refusal with an error reply."""
    def handler(msg: Message, context: Context) -> Message:
        silo = source(context)
        try:
            return handle(msg, context, silo)
        except _OWN as err:
            log.warning("%s refused to %s: %s", silo.silo_id, what, err)
            code = P.ERROR_POLICY if isinstance(err, PolicyRefusalError) else P.ERROR_REFUSED
            return Message(Error(code=code, reason=f"{type(err).__name__}: {err}"),
                           reply_to=msg)
        except MissingRoundsError:
            raise  # answered with its own code by the train handler
        except Exception as err:  # anything else: by kind, details in the silo's own log
            ref = secrets.token_hex(4)
            log.warning("%s could not %s (ref %s): %s", silo.silo_id, what, ref, err)
            return Message(Error(code=P.ERROR_REFUSED,
                                 reason=f"{type(err).__name__} while trying to {what}; "
                                        f"details in the silo's own log, ref {ref}"),
                           reply_to=msg)
    return handler


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """Exclusive lock on the silo's state directory (threads and processes alike)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(state_dir / ".spend.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also releases the lock


@dataclass(frozen=True)
class Spent:
    """What a private training spent: the ledger's cumulative epsilon, its head, and the
    entries since the head the coordinator last acknowledged, with their signer's key
    (docs/privacy.md, "Coordinator-kept heads")."""

    epsilon: float
    delta: float
    epsilon_limit: float
    ledger_head: str
    noise_multiplier: float
    ledger_chain: list[list[Any]]
    ledger_key: str


@dataclass(frozen=True)
class Request:
    """One training request, as the silo checks it against its policy."""

    federation: str
    round: int
    target_epsilon: float
    target_delta: float
    batch_size: int
    steps: int
    planned_steps: int
    ledger_since: int | None = None  # the coordinator's last recorded head of this silo


def private_training(silo: Silo, privacy: SiloPrivacyConfig, request: Request,
                     frame: pd.DataFrame, train: Callable[[DPConfig], T],
                     already_done: Callable[[SiloPrivacy], None] = lambda _: None,
                     ) -> tuple[T, Spent]:
    """Run `train(dp)` under the silo's budget (the caller checked its policy), recording
    the spend first; budget refusals come before any training. `already_done` raises when
    the request was answered before (checked under the lock)."""
    with state_lock(silo.state_dir):
        budget = SiloPrivacy(privacy)
        already_done(budget)
        units = privacy_units(frame, silo.policy.privacy_unit_column)
        q = sample_rate_for(units, request.batch_size)
        sigma = budget.noise_multiplier(request.federation, q, request.planned_steps,
                                        run_epsilon=request.target_epsilon)
        check_useful(sigma, q * units)
        step = AccountingStep(noise_multiplier=sigma, sample_rate=q, steps=request.steps)
        budget.check_round(step)  # refuse before any training
        noise_seed = silo.noise_seed(request.round)
        # Write-ahead: the spend is in the ledger before the data is touched, so a crash
        # at any point can over-count but never under-count.
        report, entry = budget.record_round(
            step=step, run_id=request.federation, round_=request.round, frame=frame,
            noise="os" if noise_seed is None else "seeded",
            unit=(silo.policy.privacy_unit, units))
        try:
            result = train(DPConfig(noise_multiplier=sigma,
                                    max_grad_norm=privacy.max_grad_norm,
                                    noise_seed=noise_seed))
        except Exception as err:
            log.error("%s: round %d failed after training began (%s); its spend is "
                      "recorded in the ledger", silo.silo_id, request.round, err)
            raise SpentButFailedError(
                f"training failed after it touched the data ({type(err).__name__}); its "
                f"spend is recorded in the silo's ledger (epsilon now {report.epsilon:.4f})"
            ) from err
        chain = chain_links(budget.ledger.entries(), request.ledger_since)
    return result, Spent(report.epsilon, privacy.delta, privacy.target_epsilon,
                         str(entry["entry_hash"]), sigma, chain, budget.ledger.public_key_hex)


def privacy_units(frame: pd.DataFrame, column: str | None) -> int:
    """How many privacy units the data holds: rows, or distinct values of the unit
    column (the population that batches are Poisson-sampled from)."""
    return len(frame) if column is None else int(frame["unit"].nunique())


def spent_fields(spent: Spent | None) -> dict[str, Any]:
    """The manifest's privacy fields of a reply (none for a non-private training): the
    `Spent` fields are named as the reply's."""
    return {} if spent is None else dataclasses.asdict(spent)
