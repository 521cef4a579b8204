"""What a silo's own operator set up: its identity, private data and privacy policy.

A silo never takes these from the coordinator. A deployed silo reads them from its node
config (`silotune agent`, client/node.py); a simulation launcher hands each simulated
silo its own `Silo` through a `SiloSource` (silotune/simulations/silos.py). Whether a
silo is simulated is decided by what the operator started, never inferred.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import Context, Message

from silotune.client import node
from silotune.client.policy import SiloPolicy
from silotune.client.silo import SiloPrivacyConfig
from silotune.ml.assets import load_dataset_frame
from silotune.planning.profiles import SiloProfile
from silotune.privacy.ledger import Ledger, load_or_create_signing_key
from silotune.protocol.manifest import check_reply
from silotune.protocol.messages import Payload

LEDGER_KEY_FILE = "ledger-signing-key.pem"  # in the silo's state folder


@dataclass(frozen=True)
class Silo:
    """One silo: who it is, where its data and state live, and its own policy."""

    silo_id: str
    index: int  # a stable small integer: seeds the silo's LoRA start (public)
    state_dir: Path  # ledger signing key, kept replies, global rounds, SLM weights
    ledger_path: Path
    load_data: Callable[[], pd.DataFrame]  # its private rows (text, label)
    policy: SiloPolicy  # its own privacy policy: what it spends and answers
    profile: SiloProfile | None = None  # declared resources (FedPipe), public
    # The dataset size its operator declares public (the aggregation weight); None: none
    # declared (the coordinator then weighs silos equally). `exact_size_public`: a
    # simulation, whose one operator holds all data, declares each exact partition size.
    public_size: int | None = None
    exact_size_public: bool = False
    # Simulation only: base of reproducible DP noise (None: the OS seeds the noise, as
    # always on a deployed silo), where it ran, and the held-out rows of the task.
    noise_seed_base: int | None = None
    worker: str = ""
    held_out: Callable[[], pd.DataFrame] | None = None

    @cached_property
    def frame(self) -> pd.DataFrame:
        """This silo's private rows (loaded on first use, then kept for the call)."""
        return self.load_data()

    def declared_size(self) -> int | None:
        """The size this silo releases: declared public by its operator, or none."""
        return len(self.frame) if self.exact_size_public else self.public_size

    def reply(self, payload: Payload, msg: Message, wire_dtype: str = "fp32") -> Message:
        """`payload` as the reply to `msg`, once the release manifest lists every field
        it carries (a field it does not list never leaves the silo)."""
        check_reply(payload, simulated=self.policy.diagnostics)
        return payload.reply_to(msg, wire_dtype)

    @property
    def key_path(self) -> Path:
        return self.state_dir / LEDGER_KEY_FILE

    def ledger(self) -> Ledger:
        """The silo's signed privacy ledger."""
        return Ledger(self.ledger_path, load_or_create_signing_key(self.key_path))

    def privacy(self, max_grad_norm: float, run_epsilon: float) -> SiloPrivacyConfig:
        """The privacy settings of one training: the silo's own lifetime limit, or, for a
        silo whose policy sets none (epsilon inf), the run's target."""
        limit = self.policy.epsilon if self.policy.private else run_epsilon
        return SiloPrivacyConfig(
            silo_id=self.silo_id, target_epsilon=limit,
            delta=self.policy.delta, max_grad_norm=max_grad_norm,
            ledger_path=self.ledger_path, key_path=self.key_path)

    def noise_seed(self, round_: int) -> int | None:
        """Seed of this round's DP noise: None (the OS seeds it) unless a simulation asked
        for reproducible noise."""
        if self.noise_seed_base is None:
            return None
        seeds = np.random.SeedSequence([self.noise_seed_base, self.index, round_])
        return int(seeds.generate_state(1, np.uint64)[0] >> np.uint64(1))


SiloSource = Callable[[Context], Silo]


def deployed_silo(context: Context) -> Silo:
    """The silo that `silotune agent` started: everything from its own node config."""
    settings = node.from_node_config(context.node_config)

    def load() -> pd.DataFrame:
        return load_dataset_frame(str(settings.data_path), text_column=settings.text_column,
                                  label_column=settings.label_column,
                                  unit_column=settings.privacy_unit_column)

    return Silo(silo_id=settings.silo_id, index=settings.index,
                state_dir=settings.state_dir, ledger_path=settings.ledger_path,
                load_data=load, policy=settings.policy, profile=settings.profile,
                public_size=settings.public_size)
