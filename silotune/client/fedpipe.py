"""The silo's side of FedPipe: its resource profile and its importance reply.

The importance query (`protocol.QUERY_IMPORTANCE`) asks a silo to score every candidate
weight matrix on a small calibration batch of its own data (`silotune.planning.sensitivity`,
AdaLoRA sensitivity with smoothing). The reply carries only one number per matrix and
the length of the silo's longest example; no data, no gradients. These scores are not
covered by the DP-SGD guarantee (see README, "Automatic per-silo configuration").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import Context, Message, MetricRecord, RecordDict

from silotune.client.base_store import STORE
from silotune.config import RunConfig
from silotune.ml.assets import resolve_model
from silotune.ml.lm import encode
from silotune.planning.importance import smoothed_sensitivity
from silotune.planning.profiles import ProfileError, SiloProfile, mix_profiles
from silotune.planning.sensitivity import raw_sensitivities
from silotune.protocol import keys as P


def silo_profile(run: RunConfig, index: int, node_config: Mapping[str, Any]
                 ) -> SiloProfile | None:
    """The silo's profile: its node config's declaration first (deployments), else the
    run's simulation mix at the silo's index; None when auto-configuration is off."""
    declared = SiloProfile.from_node_config(node_config)
    if declared is not None or run.profiles == "":
        return declared
    if run.profiles == "node":
        raise ProfileError("the run asks each silo for its profile ('node') but this "
                           "silo's node config declares none: add memory-gb, gflops, "
                           "upload-mbps, download-mbps and round-seconds")
    return mix_profiles(run.profiles, run.num_silos)[index]


def importance_reply(msg: Message, model: str, frame: pd.DataFrame,
                     context: Context) -> Message:
    """Score the candidate matrices of the (unmerged) base on this silo's data."""
    cfg = msg.content.config_records[P.CONFIG]
    base, tok = STORE.get(str(resolve_model(model)), str(context.run_id), [], [])
    examples = [encode(tok, t, lab) for t, lab in zip(frame["text"], frame["label"],
                                                          strict=True)]
    steps = P.as_int(cfg[P.CALIBRATION_STEPS], P.CALIBRATION_STEPS)
    raw = raw_sensitivities(base, examples, int(tok.pad_token_id),
                            batch_size=P.as_int(cfg[P.CALIBRATION_BATCH],
                                                P.CALIBRATION_BATCH),
                            steps=steps, seed=P.as_int(cfg[P.RUN_SEED], P.RUN_SEED))
    names = sorted(raw)
    smoothed = smoothed_sensitivity(np.stack([raw[n] for n in names], axis=1))  # (M,)
    scores = MetricRecord({n: float(v) for n, v in zip(names, smoothed, strict=True)})
    metrics = MetricRecord({P.NUM_EXAMPLES: len(examples),
                            P.MAX_TOKENS: max(len(e.input_ids) for e in examples)})
    return Message(RecordDict({P.IMPORTANCE: scores, P.METRICS: metrics}), reply_to=msg)
