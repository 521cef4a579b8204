"""The LLM side of CrossLM on the tiny Llama: generation, weighted update, perplexity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silotune.ml.lm import load_model
from silotune.ml.synthetic import (
    LLMUpdateConfig,
    SyntheticExample,
    generate_examples,
    perplexity,
    update_llm,
)
from tests.conftest import TOY_LABELS

EXAMPLES = [SyntheticExample("cardiac valve acute", "heart"),
            SyntheticExample("asthma of the left", "lung"),
            SyntheticExample("rash chronic eczema", "skin"),
            SyntheticExample("pleural unspecified", "heart")]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def test_generation_is_label_conditioned_seeded_and_short(tiny):
    model, tok = tiny
    a = generate_examples(model, tok, TOY_LABELS, per_label=2, max_new_tokens=5, seed=3)
    b = generate_examples(model, tok, TOY_LABELS, per_label=2, max_new_tokens=5, seed=3)
    assert a == b and 0 < len(a) <= 6
    assert {e.label for e in a} <= set(TOY_LABELS)
    assert all(len(e.text.split()) <= 5 for e in a)


def _delta(model, base):
    return max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(),
                                                            base.parameters(), strict=True))


def test_weighted_update_accumulates_exactly_and_skips_zero_weights(tiny):
    model, tok = tiny
    weights = np.array([2.0, 0.0, 1.0, 1.0])
    cfg = LLMUpdateConfig(steps=2, learning_rate=0.01, batch_size=4, rank=2, seed=1)
    whole, _ = update_llm(model, tok, EXAMPLES, weights, cfg)
    chunked, _ = update_llm(model, tok, EXAMPLES, weights,
                            LLMUpdateConfig(**{**cfg.__dict__, "physical_batch_size": 2}))
    for p, q in zip(whole.parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    assert _delta(whole, model) > 0  # merged LoRA changed the weights
    same, loss = update_llm(model, tok, EXAMPLES, np.zeros(4), cfg)
    assert same is model and loss == 0.0
    uniform, _ = update_llm(model, tok, EXAMPLES, np.ones(4), cfg)
    assert _delta(uniform, whole) > 0  # the weights matter


def test_perplexity_is_finite_and_above_one(tiny):
    model, tok = tiny
    ppl = perplexity(model, tok, ["acute cardiac valve of the left", "rash with eczema"])
    assert np.isfinite(ppl) and ppl > 1.0
