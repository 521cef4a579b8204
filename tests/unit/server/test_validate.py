"""Reply validation: malformed adapters are excluded with a reason naming the problem."""

from __future__ import annotations

import numpy as np
import pytest

from silotune.adapters.types import AdapterError, peft_key
from silotune.ml.merge import module_shapes
from silotune.server.validate import Expected, validate_reply

SHAPES = {"layers.0.q_proj": (6, 4)}
EXPECTED = Expected(rank=2, scale=2.0, shapes=SHAPES)


def _arrays(a_shape=(2, 4), b_shape=(6, 2), fill=0.1):
    return {peft_key("layers.0.q_proj", "A"): np.full(a_shape, fill, np.float32),
            peft_key("layers.0.q_proj", "B"): np.full(b_shape, fill, np.float32)}


def test_valid_reply_becomes_an_adapter():
    adapter = validate_reply("s", _arrays(), 10, EXPECTED)
    assert adapter.num_examples == 10 and adapter.scale == 2.0
    assert adapter.modules["layers.0.q_proj"].rank == 2


@pytest.mark.parametrize(("arrays", "count", "reason"), [
    (_arrays(a_shape=(3, 4), b_shape=(6, 3)), 10, "expected (2, 4)"),
    (_arrays(fill=np.nan), 10, "NaN"),
    (_arrays(fill=np.inf), 10, "NaN or infinite"),
    (_arrays(), 0, "positive integer"),
    (_arrays(), 2.5, "positive integer"),
    ({peft_key("layers.0.q_proj", "A"): np.zeros((2, 4))}, 10, "no lora_B"),
    ({**_arrays(), peft_key("layers.1.k_proj", "A"): np.zeros((2, 4)),
      peft_key("layers.1.k_proj", "B"): np.zeros((6, 2))}, 10, "unexpected"),
    ({"embed.weight": np.zeros((2, 2))}, 10, "not a LoRA factor"),
])
def test_bad_replies_are_rejected_with_a_reason(arrays, count, reason):
    with pytest.raises(AdapterError, match=None) as err:
        validate_reply("s", arrays, count, EXPECTED)
    assert reason in str(err.value)


def test_update_norm_bound_excludes_huge_updates():
    bounded = Expected(rank=2, scale=2.0, shapes=SHAPES, max_norm=1.0)
    validate_reply("s", _arrays(fill=0.1), 10, bounded)  # ||2 B A||_F = 0.196
    with pytest.raises(AdapterError, match="exceeds the bound"):
        validate_reply("s", _arrays(fill=1.0), 10, bounded)  # 19.6


def test_update_norm_matches_dense_product():
    from silotune.adapters.types import LoraFactors
    from silotune.server.validate import update_norm

    rng = np.random.default_rng(0)
    f = LoraFactors(A=rng.normal(size=(3, 5)), B=rng.normal(size=(4, 3)))
    assert update_norm([f], 1.5) == pytest.approx(np.linalg.norm(1.5 * f.B @ f.A))


def test_module_shapes_of_a_real_model(tiny_model_dir):
    from silotune.ml.lm import load_model

    model, _ = load_model(tiny_model_dir)
    shapes = module_shapes(model, ("q_proj", "v_proj"))
    assert shapes["model.layers.0.self_attn.q_proj"] == (32, 32)
    assert shapes["model.layers.1.self_attn.v_proj"] == (16, 32)  # 2 KV heads x 8
    with pytest.raises(ValueError, match="no Linear/Conv1D modules"):
        module_shapes(model, ("nonexistent",))
