"""Shared fixtures: a tiny random Llama with a word-level tokenizer, and a toy task.

No weights are downloaded: everything is built from configs in seconds.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TOY_LABELS = ("heart", "lung", "skin")
_TOY_WORDS = {
    "heart": ["cardiac", "arrhythmia", "valve", "infarction", "atrial"],
    "lung": ["pulmonary", "asthma", "bronchitis", "pneumonia", "pleural"],
    "skin": ["dermatitis", "rash", "eczema", "psoriasis", "ulcer"],
}
_FILLER = ["acute", "chronic", "of", "the", "left", "right", "with", "without", "unspecified"]


def toy_frame(n: int = 240, seed: int = 0) -> pd.DataFrame:
    """A learnable 3-class task: each text contains words typical of its label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = TOY_LABELS[i % len(TOY_LABELS)]
        words = rng.sample(_TOY_WORDS[label], 2) + rng.sample(_FILLER, 3)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return pd.DataFrame(rows)


def build_tiny_model(path: Path) -> Path:
    """Save a 2-layer random Llama and a word-level tokenizer covering the toy task."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from silotune.ml.lm import PROMPT

    words = set(PROMPT.replace("{text}", "").replace("\n", " ").replace(":", " : ").split())
    words |= set(TOY_LABELS) | set(_FILLER) | {w for ws in _TOY_WORDS.values() for w in ws}
    vocab = {"<unk>": 0, "<eos>": 1, ":": 2, ".": 3}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>",
                                  eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, eos_token_id=1, pad_token_id=1,
                         bos_token_id=1, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def toy_dataset_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("toy-data") / "toy.jsonl"
    toy_frame().to_json(path, orient="records", lines=True)
    return path


def build_tiny_encoder(path: Path) -> Path:
    """Save a 2-layer random BERT encoder and a word-level tokenizer (a CrossLM SLM)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = set(TOY_LABELS) | set(_FILLER) | {w for ws in _TOY_WORDS.values() for w in ws}
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, pad_token_id=0)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))
