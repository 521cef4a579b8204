"""`lora-targets auto` picks the attention projections a model has; a wrong name lists
the linear modules there are. Tiny GPT-2 (Conv1D c_attn, no q_proj) and tiny Llama."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from silotune.ml.dp_sgd import DPConfig
from silotune.ml.lm import encode, load_model
from silotune.ml.merge import module_shapes
from silotune.ml.targets import TargetError, resolve_targets, resolve_targets_of
from silotune.ml.train import LocalTrainConfig, train_local
from tests.conftest import toy_frame


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A 2-layer random GPT-2 with the tiny Llama's word-level tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("tiny-gpt2")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_auto_picks_each_architectures_attention_projections(tiny_model_dir, tiny_gpt2_dir):
    llama, _ = load_model(tiny_model_dir)
    gpt2, _ = load_model(tiny_gpt2_dir)
    assert resolve_targets(llama, ("auto",)) == ("q_proj", "v_proj")
    assert resolve_targets(gpt2, ("auto",)) == ("c_attn",)
    # the same from the folder alone (meta device, no weights): the CLI's early check
    assert resolve_targets_of(tiny_gpt2_dir, ("auto",)) == ("c_attn",)
    assert resolve_targets_of(tiny_model_dir, ("q_proj", "k_proj")) == ("q_proj", "k_proj")


def test_auto_on_an_architecture_peft_does_not_list():
    class Attention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key, self.value = (torch.nn.Linear(4, 4) for _ in range(3))

    model = torch.nn.Sequential(Attention(), torch.nn.Linear(4, 2))
    assert resolve_targets(model, ("auto",)) == ("query", "value")
    with pytest.raises(TargetError, match=r"no known attention projection.*0, 1"):
        resolve_targets(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
                        ("auto",))


def test_a_wrong_name_lists_the_linear_modules(tiny_gpt2_dir):
    gpt2, _ = load_model(tiny_gpt2_dir)
    with pytest.raises(TargetError) as err:
        resolve_targets(gpt2, ("q_proj", "c_attn"))
    text = str(err.value)
    assert "--lora-targets" in text and "named q_proj;" in text
    assert "c_attn, c_fc, c_proj" in text
    with pytest.raises(TargetError, match="cannot be combined"):
        resolve_targets(gpt2, ("auto", "c_attn"))


def test_gpt2_trains_and_merges_with_auto_targets(tiny_gpt2_dir):
    """A model without q_proj trains a DP LoRA on its `auto` targets, and the update
    merges into its Conv1D weights."""
    model, tok = load_model(tiny_gpt2_dir)
    targets = resolve_targets(model, ("auto",))
    df = toy_frame(48)
    examples = [encode(tok, t, lab) for t, lab in zip(df.text, df.label, strict=True)]
    cfg = LocalTrainConfig(rank=2, alpha=4.0, targets=targets, local_steps=2, batch_size=8,
                           physical_batch_size=8, learning_rate=1e-2, init_seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PEFT's fan_in_fan_out notice for Conv1D
        result = train_local(model, examples, tok.pad_token_id, cfg,
                             dp=DPConfig(noise_multiplier=0.5, max_grad_norm=1.0))
    assert result.liveness > 0
    assert {k.split(".")[-2] for k in result.adapter} == {"lora_A", "lora_B"}
    assert all(".c_attn." in k for k in result.adapter)
    shapes = module_shapes(model, targets)
    assert len(shapes) == 2 and all(s == (96, 32) for s in shapes.values())
    assert np.isfinite(result.loss)
