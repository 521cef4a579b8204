"""Base precisions: a bf16 training copy, and the quantised-base merge rule (NumPy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from silotune.ml import precision
from silotune.ml.lm import encode, load_model
from silotune.ml.train import LocalTrainConfig, base_copy, train_local
from tests.conftest import toy_frame


def test_registry_and_unknown_precision():
    assert precision.torch_dtype("bf16") is torch.bfloat16
    assert precision.get("fp32").bytes_per_param == 4.0
    with pytest.raises(precision.UnknownPrecisionError, match="valid: fp32, bf16"):
        precision.get("int4")


def test_bf16_copy_leaves_the_fp32_master_untouched_and_keeps_ties(tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = base_copy(model, "bf16")
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_training_on_a_bf16_base_gives_fp32_factors_close_to_fp32(tiny_model_dir):
    model, tok = load_model(tiny_model_dir)
    df = toy_frame(48)
    ex = [encode(tok, t, lab) for t, lab in zip(df.text, df.label, strict=True)]
    results = {}
    for name in ("fp32", "bf16"):
        cfg = LocalTrainConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"),
                               local_steps=2, batch_size=16, physical_batch_size=16,
                               learning_rate=1e-2, init_seed=3, base_precision=name)
        results[name] = train_local(model, ex, tok.pad_token_id, cfg, dp=None)
    for key, value in results["bf16"].adapter.items():
        assert value.dtype == np.float32
        if ".lora_B." in key:  # B starts at 0: it is all update
            # same start, same batches: the bf16 base only perturbs the updates a little
            # (AdamW may flip the sign of near-zero coordinates, so compare directions)
            ref = results["fp32"].adapter[key].ravel()
            cosine = value.ravel() @ ref / (np.linalg.norm(value) * np.linalg.norm(ref))
            assert cosine > 0.9, (key, cosine)
    assert results["bf16"].liveness > 0


def test_quantise_blockwise_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(7, 50)).astype(np.float32)  # 350 values: a partial last block
    codes, scales = precision.quantise_blockwise(w, bits=8, block=64)
    back = precision.dequantise_blockwise(codes, scales, w.shape, bits=8, block=64)
    steps = np.repeat(scales / 127, 64)[: w.size].reshape(w.shape)
    assert np.all(np.abs(back - w) <= steps / 2 + 1e-7)


def test_requantising_from_the_master_does_not_accumulate_rounding():
    rng = np.random.default_rng(1)
    master = rng.normal(size=(16, 64)).astype(np.float32)
    naive = master.copy()  # dequantise -> add -> requantise, with no master copy
    for _ in range(20):
        delta = 1e-3 * rng.normal(size=master.shape).astype(np.float32)
        master, (codes, scales) = precision.requantise_merge(master, delta)
        q_naive = precision.quantise_blockwise(naive + delta)
        naive = precision.dequantise_blockwise(*q_naive, master.shape)
    from_master = precision.dequantise_blockwise(codes, scales, master.shape)
    err_master = np.abs(from_master - master).max()
    err_naive = np.abs(naive - master).max()
    step = float(np.abs(master).max() / 127)
    assert err_master <= step / 2 + 1e-6  # one rounding, whatever the rounds
    assert err_naive > err_master  # the naive path drifts
