"""The silo agent as a Flower ClientApp: hello, importance, train (and CrossLM) handlers.

Thin: each handler reads its typed message (`silotune.protocol.messages`), calls the
silo's data, training and privacy code, and answers with a typed reply. Everything the
silo decides for itself (identity, data, privacy limits) comes from the `SiloSource` its
operator started it with, never from the coordinator's run config. Known failures
(budget exhausted, frozen LoRA, a malformed message) become coded error replies that the
coordinator logs and records; the round goes on without that silo.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from silotune.client import crosslm
from silotune.client.fedpipe import importance_reply
from silotune.client.history import MissingRoundsError
from silotune.client.local import SiloSource, deployed_silo
from silotune.client.spend import refusing
from silotune.client.training import train_round
from silotune.protocol import keys as P
from silotune.protocol.messages import HelloReply

log = logging.getLogger(__name__)


def build_client_app(source: SiloSource = deployed_silo,
                     mods: list[Mod] | None = None) -> ClientApp:
    """The ClientApp of the silos `source` describes (default: the deployed silo of the
    node config); `mods` wrap every handler."""
    app = ClientApp(mods=mods)

    @app.query("hello")
    def hello(msg: Message, context: Context) -> Message:
        silo = source(context)
        declared = silo.profile.to_node_config() if silo.profile is not None else None
        return silo.reply(HelloReply(silo_id=silo.silo_id, num_examples=silo.declared_size(),
                                     profile=dict(declared) if declared else None), msg)

    app.query("importance")(refusing(source, "score importance", importance_reply))
    train = refusing(source, "train", train_round)

    @app.train()
    def train_lora(msg: Message, context: Context) -> Message:
        try:
            return train(msg, context)
        except MissingRoundsError as err:
            log.warning("%s", err)
            return Message(Error(code=P.ERROR_MISSING_ROUNDS, reason=str(err)), reply_to=msg)

    crosslm.register(app, source)
    return app

