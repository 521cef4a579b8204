"""Names shared by the coordinator (ServerApp) and the silos (ClientApp).

Every record key and message field that crosses the wire is defined once, here, so that
the two sides can never spell it differently.
"""

from __future__ import annotations

from typing import Final

# Message types. Training uses Flower's "train"; the hello handshake is a query.
QUERY_HELLO: Final = "query.hello"
QUERY_IMPORTANCE: Final = "query.importance"  # FedPipe: per-matrix sensitivity scores

# RecordDict keys.
ARRAYS: Final = "arrays"  # ArrayRecord: a silo's adapter (reply) or the global update (train)
METRICS: Final = "metrics"  # MetricRecord: numbers from a silo
CONFIG: Final = "config"  # ConfigRecord: the round's settings for one silo
INFO: Final = "info"  # ConfigRecord: a silo's self-description (hello reply)
IMPORTANCE: Final = "importance"  # MetricRecord: module name -> smoothed sensitivity
PROFILE: Final = "profile"  # ConfigRecord (hello reply): the silo's resource profile

# Weighting key: the silo's number of training examples (p_k = n_k / sum n_j).
NUM_EXAMPLES: Final = "num-examples"

# Metric keys in a train reply.
EPSILON: Final = "epsilon"
DELTA: Final = "delta"
STEPS: Final = "steps"
EPSILON_LIMIT: Final = "epsilon-limit"
NOISE_MULTIPLIER: Final = "noise-multiplier"  # sigma the silo calibrated for the run
LEDGER_HEAD: Final = "ledger-head"
# The ledger entries appended since the head the coordinator last acknowledged (info, JSON
# [[seq, prev_hash, entry_hash, signature], ...]), their signer's public key (info, hex),
# and, in a request, the seq of that acknowledged head (config; absent: none yet).
LEDGER_CHAIN: Final = "ledger-chain"
LEDGER_KEY: Final = "ledger-key"
LEDGER_SINCE: Final = "ledger-since"
WORKER_NODE: Final = "worker-node"  # info: the machine (Ray node id) that ran the silo
PEAK_MEMORY: Final = "peak-memory-bytes"  # peak RSS of the silo's training, above its start
BASE_VERSION: Final = "base-version"  # global rounds the silo now holds on disk

# Error codes of a silo's error reply (the reason names the problem).
ERROR_REFUSED: Final = 1001  # refused: budget, liveness, bad input, non-DP SLM, ...
ERROR_MISSING_ROUNDS: Final = 1002  # lost its copy of global rounds: send all of them
ERROR_POLICY: Final = 1003  # the request is outside the silo's own privacy policy

# Config keys in a train message.
ROUND: Final = "round"
SILO_ID: Final = "silo-id"
RANK: Final = "rank"
ALPHA: Final = "alpha"
TARGETS: Final = "targets"
LOCAL_STEPS: Final = "local-steps"
PLANNED_ROUNDS: Final = "planned-rounds"
BATCH_SIZE: Final = "batch-size"
LEARNING_RATE: Final = "learning-rate"
BASE_FINGERPRINTS: Final = "base-fingerprints"  # JSON list: sha256 of each merged round
FIRST_SENT_ROUND: Final = "first-sent-round"  # the message carries rounds >= this one
UPDATE_SCALES: Final = "update-scales"  # JSON: {"<round>": scale} of the broadcast updates
RUN_SEED: Final = "run-seed"
FEDERATION_ID: Final = "federation-id"  # stable across coordinator restarts (resume)
FROZEN_FACTORS: Final = "frozen-factors"  # comma-separated, e.g. "A" (FFA-LoRA)
UPLOAD_FACTORS: Final = "upload-factors"  # factors the silo sends back, e.g. "A,B"
INIT_SEED: Final = "init-seed"  # the silo's start is seeded_start(shapes, rank, seed)
WIRE_DTYPE: Final = "wire-dtype"  # "fp16" or "fp32"
UPLOAD_DENSITY: Final = "upload-density"  # < 1: compress uploads (ComPEFT-style top-k)
LOCAL_FACTORS: Final = "local-factors"  # factors kept on the silo across rounds (FedSA)
PHYSICAL_BATCH_SIZE: Final = "physical-batch-size"  # micro-batch (memory) of DP-SGD
BASE_PRECISION: Final = "base-precision"  # precision of the silo's training copy of the base
MODEL: Final = "model"  # the base model (registered name or folder) the silo trains
MAX_GRAD_NORM: Final = "max-grad-norm"  # DP-SGD clipping norm C
TARGET_EPSILON: Final = "target-epsilon"  # the run's epsilon ("inf": a non-private run)
TARGET_DELTA: Final = "target-delta"

# Keys of an importance query and its reply (FedPipe).
CALIBRATION_STEPS: Final = "calibration-steps"
CALIBRATION_BATCH: Final = "calibration-batch"
MAX_TOKENS: Final = "max-tokens"  # the silo's longest encoded example (memory model)

# Array-name prefix of the broadcast global updates: "round-<t>/<module>.lora_{A,B}".
UPDATE_PREFIX: Final = "round-"
# Array-name prefix of a silo's starting factors (scale-1 convention): "init/<module>...".
INIT_PREFIX: Final = "init/"


def as_int(value: object, key: str) -> int:
    """A record value read as int; a clear error names the key otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"message field '{key}' = {value!r} is not an integer")
    return int(value)


def as_float(value: object, key: str) -> float:
    """A record value read as float; a clear error names the key otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"message field '{key}' = {value!r} is not a number")
    return float(value)


def as_tuple(value: object) -> tuple[str, ...]:
    """A comma-separated record value as a tuple of names ("" gives ())."""
    return tuple(part for part in str(value).split(",") if part)

# CrossLM mode (silotune/server/crosslm.py <-> silotune/client/crosslm.py).
TRAIN_SLM: Final = "slm"  # handler name: message type "train.slm" (SLM training)
QUERY_SCORE: Final = "score"  # handler name: message type "query.score" (feedback)
SYNTHETIC: Final = "synthetic"  # JSON [[text, label], ...]: the LLM's public synthetic data
LABELS: Final = "labels"  # JSON list of the task's labels, in the SLM head's order
PRIVATE_RUN: Final = "private-run"  # 1, or 0 when the run is marked non-private
SLM: Final = "slm"  # the silo's small model (registered name or encoder folder)
SLM_STEPS: Final = "slm-steps"
SLM_ACCURACY: Final = "slm-accuracy"  # the silo's SLM on held-out private-style data
SCORES: Final = "scores"  # p_SLM(y_j | x_j) per synthetic example: a feedback reply's payload
SLM_DP: Final = "slm-dp"  # 1 when the scoring SLM was trained with DP-SGD
