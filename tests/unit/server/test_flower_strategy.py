"""The thin Flower adapter: FedAvg's messaging with a silotune rule in aggregate_train."""

from __future__ import annotations

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)

from silotune.adapters.codec import update_from_arrays
from silotune.adapters.types import peft_key
from silotune.protocol import keys as P
from silotune.server.flower_strategy import SCALE_KEY, LoraRuleStrategy

SHAPES = {"layers.0.q_proj": (6, 5), "layers.0.v_proj": (4, 5)}


def _reply(node: int, rank: int, n: int, seed: int, bad: bool = False) -> Message:
    rng = np.random.default_rng(seed)
    arrays = {}
    for module, (d_out, d_in) in SHAPES.items():
        arrays[peft_key(module, "A")] = rng.normal(size=(rank, d_in)).astype(np.float32)
        arrays[peft_key(module, "B")] = rng.normal(size=(d_out, rank)).astype(np.float32)
    if bad:
        arrays[peft_key("layers.0.q_proj", "B")][0, 0] = np.nan
    content = RecordDict({
        P.ARRAYS: ArrayRecord(array_dict={k: _array(v) for k, v in arrays.items()}),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, "local-metric": float(seed)})})
    metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node,
                        dst_node_id=0, reply_to_message_id=f"ask-{node}", group_id="1",
                        created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content, metadata=metadata)


def _array(v: np.ndarray) -> Array:
    return Array.from_numpy_ndarray(v)


def _dense(record: ArrayRecord) -> dict[str, np.ndarray]:
    arrays = {k: v.numpy() for k, v in record.items()}
    update = update_from_arrays(arrays, "", float(arrays.pop(SCALE_KEY)[0]))
    return {m: update.dense(m) for m in update.modules}


def test_flora_through_the_flower_adapter_is_the_weighted_sum_of_silo_updates():
    strategy = LoraRuleStrategy(SHAPES, rule="flora", alpha_per_rank=2.0)
    replies = [_reply(1, 4, 30, seed=1), _reply(2, 2, 10, seed=2)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    expected = {m: np.zeros(s) for m, s in SHAPES.items()}
    for reply, p in zip(replies, (0.75, 0.25), strict=True):
        got = {k: v.numpy().astype(np.float64) for k, v in reply.content[P.ARRAYS].items()}
        for m in SHAPES:
            expected[m] += p * 2.0 * got[peft_key(m, "B")] @ got[peft_key(m, "A")]
    for m, dense in _dense(arrays).items():
        np.testing.assert_allclose(dense, expected[m], rtol=1e-5, atol=1e-6)  # fp32 wire
    assert metrics["local-metric"] == 0.75 * 1 + 0.25 * 2  # FedAvg's weighted metric average


def test_a_bad_reply_is_excluded_with_its_reason_and_the_rest_aggregate():
    strategy = LoraRuleStrategy(SHAPES, rule="flora")
    arrays, _ = strategy.aggregate_train(3, [_reply(1, 4, 30, seed=1),
                                             _reply(2, 4, 10, seed=2, bad=True)])
    assert arrays is not None
    assert strategy.excluded == [{"round": 3, "node": "node-2",
                                  "reason": "layers.0.q_proj: factors contain NaN or "
                                            "infinite values"}]
    only = LoraRuleStrategy(SHAPES, rule="flora")
    alone, _ = only.aggregate_train(3, [_reply(1, 4, 30, seed=1)])
    assert alone is not None
    for m, dense in _dense(arrays).items():
        np.testing.assert_allclose(dense, _dense(alone)[m])
    nothing, _ = LoraRuleStrategy(SHAPES).aggregate_train(1, [_reply(2, 4, 5, 2, bad=True)])
    assert nothing is None
