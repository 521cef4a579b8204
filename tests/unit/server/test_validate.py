"""Reply validation: malformed adapters are excluded with a reason naming the problem."""

from __future__ import annotations

import re

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


# -- the derived update-norm bound (docs/algorithms.md §11) -----------------------------
def test_adam_drift_golden_numbers():
    from silotune.server.validate import adam_drift

    assert adam_drift(0.01, 1) == pytest.approx(0.01)  # c_1 = 1: Adam's first step is lr
    # c_2 = 0.1/0.19 * sqrt(1.999) * sqrt(1 + 0.81/0.999), by hand
    assert adam_drift(1.0, 2) == pytest.approx(1 + 0.1 / 0.19 * 1.999**0.5
                                               * (1 + 0.81 / 0.999) ** 0.5)
    assert 5.0 < adam_drift(1.0, 5) < 5.1  # barely above lr per step for few steps


@pytest.mark.parametrize("pattern", ["constant", "random", "growing", "alternating"])
def test_adam_drift_bounds_every_coordinate_of_torch_adamw(pattern):
    """torch.optim.AdamW as the silos build it (weight decay 0): no coordinate moves
    further than `adam_drift`, and constant gradients nearly reach it (tight)."""
    import torch

    from silotune.server.validate import adam_drift

    lr, steps = 1e-2, 8
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.zeros(4096))
    opt = torch.optim.AdamW([param], lr=lr, weight_decay=0.0)
    scales = torch.logspace(-6, 3, 4096)  # coordinates of wildly different gradient scale
    for t in range(steps):
        opt.zero_grad()
        g = {"constant": torch.ones(4096),
             "random": torch.randn(4096, generator=gen),
             "growing": torch.full((4096,), 10.0**t),
             "alternating": torch.full((4096,), (-1.0) ** t)}[pattern]
        param.grad = g * scales
        opt.step()
    moved = float(param.detach().abs().max())
    assert moved <= adam_drift(lr, steps)
    if pattern == "constant":
        assert moved > 0.98 * adam_drift(lr, steps)


def _trained(tiny_model_dir, dp, start_b=0.0, steps=5):
    """A silo's real training on the tiny Llama from a seeded start (FLoRA) or a start
    with a non-zero B (a rule that continues from the global adapter)."""
    from silotune.adapters.compression import peft_b
    from silotune.adapters.starts import seeded_start
    from silotune.adapters.types import LoraFactors
    from silotune.ml.dp_sgd import DPConfig
    from silotune.ml.lm import encode, load_model
    from silotune.ml.train import LocalTrainConfig, train_local
    from tests.conftest import toy_frame

    model, tok = load_model(tiny_model_dir)
    shapes = module_shapes(model, ("q_proj", "v_proj"))
    rank, scale = 4, 2.0
    rng = np.random.default_rng(1)
    start = {m: LoraFactors(A=f.A.astype(np.float32),
                            B=(start_b * rng.standard_normal(f.B.shape)).astype(np.float32))
             for m, f in seeded_start(shapes, rank, 11).modules.items()}
    df = toy_frame(64)
    examples = [encode(tok, t, lab) for t, lab in zip(df.text, df.label, strict=True)]
    cfg = LocalTrainConfig(
        rank=rank, alpha=scale * rank, targets=("q_proj", "v_proj"), local_steps=steps,
        batch_size=16, physical_batch_size=16, learning_rate=1e-2, init_seed=3,
        init={m: (f.A, peft_b(f.B, scale)) for m, f in start.items()})
    private = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, noise_seed=5) if dp else None
    result = train_local(model, examples, tok.pad_token_id, cfg, private)
    return result.adapter, Expected(rank=rank, scale=scale, shapes=shapes, start=start)


@pytest.mark.parametrize(("dp", "start_b"), [(True, 0.0), (False, 0.0), (True, 0.05),
                                             (False, 0.05)])
def test_real_training_stays_under_the_derived_bound(tiny_model_dir, dp, start_b):
    """Five local steps at the default learning rate (1e-2), DP on and off, from a
    seeded start and from a start with a non-zero B: the honest update is under the
    derived bound (no margin), and an update just over bound x margin is excluded."""
    from silotune.adapters.types import modules_from_peft
    from silotune.server.validate import BOUND_MARGIN, adam_drift, derived_bound, update_norm

    arrays, expected = _trained(tiny_model_dir, dp, start_b)
    norm = update_norm(modules_from_peft(arrays).values(), expected.scale)
    bound = derived_bound(expected, adam_drift(1e-2, 5))
    print(f"dp={dp} start_b={start_b}: honest ||s B A||_F = {norm:.4f}, derived bound "
          f"{bound:.4f} (ratio {norm / bound:.2f}), with margin {BOUND_MARGIN * bound:.4f}")
    assert 0 < norm <= bound
    bounded = Expected(rank=expected.rank, scale=expected.scale, shapes=expected.shapes,
                       start=expected.start, max_norm=BOUND_MARGIN * bound)
    validate_reply("s", arrays, 10, bounded)
    over = BOUND_MARGIN * bound * 1.01 / norm  # B scaled: the update grows linearly
    pushed = {k: v * over if "lora_B" in k else v for k, v in arrays.items()}
    with pytest.raises(AdapterError, match="exceeds the bound"):
        validate_reply("s", pushed, 10, bounded)


def test_derived_bound_by_hand():
    """One module, A0 = [I 0] (||A0||_2 = 1), B0 = 0, drift 0.1, r = 2, d_out = d_in = 8:
    s (0.1 sqrt(16)) (1 + 0.1 sqrt(16)) = 2 * 0.4 * 1.4; without an uploaded A the
    second factor is ||A0||_2 = 1; a kept B after 3 earlier rounds: (0.4 + 3 * 0.4)."""
    from silotune.adapters.types import LoraFactors
    from silotune.server.validate import derived_bound

    start = {"m": LoraFactors(A=np.eye(2, 8), B=np.zeros((8, 2)))}
    both = Expected(rank=2, scale=2.0, shapes={"m": (8, 8)}, start=start)
    assert derived_bound(both, 0.1) == pytest.approx(2 * 0.4 * 1.4)
    b_only = Expected(rank=2, scale=2.0, shapes={"m": (8, 8)}, start=start, upload=("B",))
    assert derived_bound(b_only, 0.1) == pytest.approx(2 * 0.4 * 1.0)
    assert derived_bound(both, 0.1, local=("B",), prior_rounds=3) == pytest.approx(
        2 * 1.6 * 1.4)
    a_only = Expected(rank=2, scale=2.0, shapes={"m": (8, 8)}, start=start, upload=("A",))
    assert derived_bound(a_only, 0.1) == 0.0  # B stands in as zeros


# -- aggregation weights ----------------------------------------------------------------
def test_registered_sizes_are_the_weights_whatever_the_replies_claim(caplog):
    from silotune.server.registry import RegisteredSilo, SiloRegistry
    from silotune.server.validate import aggregation_weights

    registry = SiloRegistry({"a": RegisteredSilo(examples=40), "b": RegisteredSilo(30)})
    assert aggregation_weights({"a": 10**15, "b": 30}, registry) == {"a": 40, "b": 30}
    assert aggregation_weights({"a": None, "b": None}, registry) == {"a": 40, "b": 30}
    partial = SiloRegistry({"a": RegisteredSilo(examples=40), "b": RegisteredSilo()})
    with caplog.at_level("WARNING"):
        assert aggregation_weights({"a": 10**15, "b": 30}, partial) == {"a": 1, "b": 1}
    assert "no registered size for ['b']" in caplog.text
    # no registry (a simulation): the sizes the silos' operators declared, or equal
    assert aggregation_weights({"a": 7, "b": 3}, SiloRegistry()) == {"a": 7, "b": 3}
    assert aggregation_weights({"a": 7, "b": None}, SiloRegistry()) == {"a": 1, "b": 1}


# -- every field of a reply: type, finiteness, range, meaning -------------------------
def _reply_content(**metrics):
    from flwr.app import MetricRecord

    from silotune.protocol import keys as P
    from silotune.protocol.messages import TrainReply

    content = TrainReply(silo_id="a", num_examples=10, base_version=2, steps=5, epsilon=1.0,
                         delta=1e-5, epsilon_limit=8.0, noise_multiplier=1.1,
                         ledger_head="ab" * 32).to_content()
    values = dict(content.metric_records[P.METRICS])
    for key, value in metrics.items():
        if value is None:
            values.pop(key)
        else:
            values[key] = value
    content[P.METRICS] = MetricRecord(values)
    return content


@pytest.mark.parametrize(("metrics", "fragment"), [
    ({"num-examples": float("inf")}, "'num-examples' = inf is not a finite integer"),
    ({"num-examples": 0}, "'num-examples' = 0 is out of range; allowed: [1, inf)"),
    ({"epsilon": float("nan")}, "'epsilon' = nan is not finite"),
    ({"epsilon": float("inf")}, "'epsilon' = inf is not finite"),
    ({"epsilon-limit": None}, "without ['epsilon_limit']"),
    ({"epsilon": 9.0}, "epsilon 9 exceeds the silo's epsilon-limit 8"),
    ({"epsilon": -1.0}, "'epsilon' = -1.0 is out of range"),
    ({"delta": 1.5}, "'delta' = 1.5 is out of range; allowed: (0, 1)"),
    ({"noise-multiplier": -0.5}, "'noise-multiplier' = -0.5 is out of range"),
    ({"base-version": float("inf")}, "'base-version' = inf is not a finite integer"),
    ({"base-version": -1}, "'base-version' = -1 is out of range; allowed: [0, inf)"),
    ({"peak-memory-bytes": float("nan")}, "'peak-memory-bytes' = nan is not a finite"),
    ({"peak-memory-bytes": -5}, "'peak-memory-bytes' = -5 is out of range"),
    ({"steps": 0}, "'steps' = 0 is out of range"),
    ({"steps": 2.5}, "'steps' = 2.5 is not a finite integer"),
])
def test_each_malformed_reply_field_is_refused_naming_it(metrics, fragment):
    from silotune.protocol.messages import MessageError, TrainReply

    with pytest.raises(MessageError) as err:
        TrainReply.from_content(_reply_content(**metrics))
    assert fragment in str(err.value)


@pytest.mark.parametrize("silo_id", ["", "a b", "../etc", "x" * 129, "tab\there", "a'b"])
def test_a_silo_id_must_be_a_name(silo_id):
    from flwr.app import ConfigRecord

    from silotune.protocol import keys as P
    from silotune.protocol.messages import HelloReply, MessageError

    content = _reply_content()
    content[P.INFO] = ConfigRecord({P.SILO_ID: silo_id})
    with pytest.raises(MessageError, match="is not a silo name"):
        HelloReply.from_content(content)


def test_reply_fields_must_match_the_round_they_answer():
    from silotune.config import RunConfig
    from silotune.protocol.messages import TrainReply
    from silotune.server.exchange import check_reply_fields

    cfg = RunConfig(local_steps=5)  # private (epsilon 8)
    answer = TrainReply.from_content(_reply_content())
    check_reply_fields(answer, "a", cfg, merged=2)
    for silo, merged, fragment in [("b", 2, "reply claims silo id 'a'; this node is 'b'"),
                                   ("a", 3, "base-version 2 differs from the 3 merged")]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            check_reply_fields(answer, silo, cfg, merged)
    with pytest.raises(ValueError, match="reports 5 steps; the round asked for 4"):
        check_reply_fields(answer, "a", RunConfig(local_steps=4), 2)
    plain = TrainReply(silo_id="a", num_examples=10, base_version=2, steps=5)
    check_reply_fields(plain, "a", RunConfig(target_epsilon=float("inf")), 2)
    with pytest.raises(ValueError, match="carries no privacy accounting"):
        check_reply_fields(plain, "a", cfg, 2)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_importance_scores_that_overflow_exclude_only_their_silo(monkeypatch):
    """FedPipe's importance query: a reply whose scores sum to inf is refused alone."""
    from types import SimpleNamespace

    from silotune.config import RunConfig
    from silotune.protocol.messages import ImportanceReply
    from silotune.server import fedpipe

    replies = {"a": ImportanceReply(max_tokens=64, num_examples=10,
                                    scores={"l.0.q_proj": 1.0, "l.0.v_proj": 3.0}),
               "b": ImportanceReply(max_tokens=64, num_examples=10,
                                    scores={"l.0.q_proj": 1e308, "l.0.v_proj": 1e308})}
    monkeypatch.setattr(fedpipe, "broadcast", lambda *_: (
        {s: SimpleNamespace(content=r.to_content()) for s, r in replies.items()}, []))
    scores, _, refused = fedpipe.query_importance(None, RunConfig(), dict.fromkeys("ab"), "f")
    assert scores == {"l.0.q_proj": 0.25, "l.0.v_proj": 0.75}
    assert [r["silo"] for r in refused] == ["b"] and "finite" in refused[0]["reason"]
