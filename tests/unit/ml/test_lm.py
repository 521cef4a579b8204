"""Task encoding, per-sequence loss and KV-cached label scoring on a tiny model."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from silotune.ml.lm import (
    CUE,
    IGNORE_INDEX,
    MAX_PROMPT_TOKENS,
    PROMPT,
    answer_ids,
    check_labels_differ,
    collate,
    encode,
    evaluate,
    load_model,
    per_sequence_loss,
    prompt_ids,
    score_labels,
    scored_label_ids,
    warn_if_truncated,
)
from tests.conftest import TOY_LABELS


def _full_sequence_scores(model, tok, texts, labels):
    """Reference: one full forward pass per (text, label) pair, no cache."""
    out = np.zeros((len(texts), len(labels)))
    for i, text in enumerate(texts):
        p = prompt_ids(tok, text)
        for j, a in enumerate(scored_label_ids(tok, labels)):
            ids = torch.tensor([p + a])
            with torch.no_grad():
                lp = model(input_ids=ids).logits[0].log_softmax(-1)
            out[i, j] = sum(lp[len(p) - 1 + k, t].item() for k, t in enumerate(a))
    return out


def test_cached_scoring_equals_full_sequences(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    texts = ["cardiac valve of the left", "asthma", "chronic eczema with rash unspecified"]
    labels = [*TOY_LABELS, "heart lung", "skin rash ulcer"]  # multi-token continuations
    fast = score_labels(model, tok, texts, labels, batch_size=2)
    np.testing.assert_allclose(fast, _full_sequence_scores(model, tok, texts, labels),
                               rtol=1e-4, atol=1e-4)


def test_encode_masks_prompt_and_keeps_answer(tiny_model_dir):
    _, tok = load_model(tiny_model_dir)
    e = encode(tok, "cardiac valve", "heart")
    answer = answer_ids(tok, "heart")
    assert e.labels[-len(answer):] == answer
    assert all(v == IGNORE_INDEX for v in e.labels[: -len(answer)])


def test_per_sequence_loss_weights_sequences_equally():
    # Sequence 0 has one answer token, sequence 1 has three: each counts 1/2.
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1],
                           [IGNORE_INDEX, 2, 2, 2]])
    logits = torch.zeros(2, 4, 5)
    logits[0, 2, 1] = 10.0  # sequence 0 predicts its token almost surely
    loss = per_sequence_loss(logits, labels)
    uniform = float(np.log(5))
    expected = (torch.nn.functional.cross_entropy(logits[0, 2:3], labels[0, 3:4]).item()
                + uniform) / 2
    assert abs(loss.item() - expected) < 1e-5


def test_collate_pads_right_and_masks(tiny_model_dir):
    _, tok = load_model(tiny_model_dir)
    batch = [encode(tok, "asthma", "lung"), encode(tok, "cardiac valve of the left", "heart")]
    out = collate(batch, pad_id=tok.pad_token_id)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape
    assert out["attention_mask"][0].sum() == len(batch[0].input_ids)
    assert (out["labels"][0, len(batch[0].input_ids):] == IGNORE_INDEX).all()


def test_evaluate_reports_accuracy_in_range(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    res = evaluate(model, tok, ["asthma", "rash"], ["lung", "skin"], list(TOY_LABELS))
    assert 0.0 <= res.accuracy <= 1.0 and res.loss > 0


def test_eos_is_scored_only_when_a_label_prefixes_another(tiny_model_dir):
    _, tok = load_model(tiny_model_dir)
    assert all(len(ids) == 1 for ids in scored_label_ids(tok, TOY_LABELS))
    ids = scored_label_ids(tok, ["heart", "heart lung"])
    assert [i[-1] for i in ids] == [tok.eos_token_id] * 2


def test_a_long_text_keeps_the_cue_and_training_reads_what_evaluation_reads(
        tiny_model_dir, caplog):
    _, tok = load_model(tiny_model_dir)
    long_text = " ".join(["cardiac valve of the left"] * 40)  # ~200 tokens
    prompt = prompt_ids(tok, long_text)
    cue = tok(CUE, add_special_tokens=False)["input_ids"]
    assert len(prompt) == MAX_PROMPT_TOKENS and prompt[-len(cue):] == cue
    example = encode(tok, long_text, "heart")
    assert example.input_ids[:len(prompt)] == prompt  # the same prompt as evaluation
    short = "asthma"  # fits: tokenized whole, as before
    assert prompt_ids(tok, short) == tok(PROMPT.format(text=short),
                                         add_special_tokens=False)["input_ids"]
    with caplog.at_level("WARNING"):
        share = warn_if_truncated(tok, [long_text, short, short, short], "held-out")
    assert share == 0.25 and "25% of the held-out prompts" in caplog.text


def test_cached_scoring_uses_the_models_own_cache_name(tiny_model_dir, caplog):
    """Multi-token labels re-use the prompt's KV cache under the name the installed
    transformers gives it: no `past_key_values` deprecation warning or log line."""
    import warnings

    model, tok = load_model(tiny_model_dir)
    labels = ["heart lung", "skin"]  # the first needs the cached continuation
    assert len(scored_label_ids(tok, labels)[0]) > 1
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        scores = score_labels(model, tok, ["cardiac valve"], labels)
    np.testing.assert_allclose(scores, _full_sequence_scores(model, tok, ["cardiac valve"],
                                                             labels), atol=1e-4)
    assert not [r for r in caplog.records if "past_key_values" in r.getMessage()]


def test_labels_that_tokenize_identically_are_refused_by_name(tiny_model_dir):
    _, tok = load_model(tiny_model_dir)
    check_labels_differ(tok, list(TOY_LABELS))
    unknown = [w for w in ("zebra-x", "quokka-y") if answer_ids(tok, w) == answer_ids(
        tok, "zebra-x")]
    assert len(unknown) == 2, "the tiny tokenizer should map both unknown words alike"
    with pytest.raises(ValueError, match="labels 'zebra-x' and 'quokka-y' are the same tokens"):
        check_labels_differ(tok, ["heart", *unknown])
