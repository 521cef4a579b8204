"""Compact transport: fp16 round trip and ComPEFT-style top-k ternary compression."""

from __future__ import annotations

import numpy as np
import pytest

from silotune.adapters.compression import (
    COMPRESSED_SUFFIX,
    compress,
    compress_arrays,
    decompress,
    decompress_arrays,
    round_trip,
    upload_reference,
)
from silotune.adapters.types import LoraFactors, peft_key


def test_compress_keeps_top_k_signs_with_mean_magnitude():
    tau = np.array([[0.1, -5.0, 0.2], [3.0, -0.05, 1.0]], dtype=np.float32)
    out = decompress(compress(tau, density=0.5))  # k = 3: -5, 3, 1
    scale = (5.0 + 3.0 + 1.0) / 3
    expected = np.array([[0, -scale, 0], [scale, 0, scale]], dtype=np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_full_density_preserves_signs_and_support():
    rng = np.random.default_rng(0)
    tau = rng.normal(size=(70, 1000)).astype(np.float32)  # > 65,536 entries: uint32 indices
    out = decompress(compress(tau, density=1.0))
    assert out.shape == tau.shape
    np.testing.assert_array_equal(np.sign(out), np.sign(tau))


@pytest.mark.parametrize("density, at_least", [(0.1, 25), (0.5, 20), (0.9, 16)])
def test_compressed_upload_is_much_smaller_than_fp32(density, at_least):
    rng = np.random.default_rng(1)
    factors = {"a": rng.normal(size=(8, 576)), "b": rng.normal(size=(576, 8))}
    dense = sum(v.astype(np.float32).nbytes for v in factors.values())
    blobs = compress_arrays(factors, {}, density=density)
    assert dense / sum(b.nbytes for b in blobs.values()) > at_least


@pytest.mark.parametrize("density", [0.01, 0.05, 0.3, 0.5, 1.0])
def test_both_position_layouts_decode_exactly(density):
    """Sparse tensors send indices, dense ones a bitmask; either decodes the same."""
    rng = np.random.default_rng(2)
    tau = rng.normal(size=(40, 50)).astype(np.float32)
    k = int(np.ceil(density * tau.size))
    out = decompress(compress(tau, density))
    kept = np.argsort(-np.abs(tau).ravel(), kind="stable")[:k]
    assert np.count_nonzero(out) == k
    np.testing.assert_array_equal(np.flatnonzero(out), np.sort(kept))
    np.testing.assert_array_equal(np.sign(out.ravel()[kept]), np.sign(tau.ravel()[kept]))
    np.testing.assert_allclose(np.abs(out.ravel()[kept]), np.abs(tau.ravel()[kept]).mean(),
                               rtol=1e-6)
    bits = 8 * compress(tau, density).nbytes
    assert bits <= min(17 * k, tau.size + k) + 8 * 64  # positions + signs + header


def test_changes_are_compressed_relative_to_the_start():
    start = {"x": np.full((4, 4), 7.0, np.float32)}
    now = {"x": start["x"].copy()}
    now["x"][1, 2] += 0.5
    back = decompress_arrays(compress_arrays(now, start, density=1 / 16), start)
    np.testing.assert_allclose(back["x"], now["x"])


def test_bad_density_and_corrupt_blob():
    with pytest.raises(ValueError, match="density"):
        compress(np.ones(4), density=0.0)
    blob = compress(np.arange(10, dtype=np.float32), density=0.5)
    with pytest.raises(ValueError, match="corrupt"):
        decompress(blob[:-3])
    with pytest.raises(ValueError, match="corrupt"):
        decompress(blob[:5])


def test_fp16_round_trip_is_what_the_receiver_decodes():
    x = {"w": np.array([1 / 3, 1e-3, 60000.0], dtype=np.float64)}
    got = round_trip(x, "fp16")["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x["w"].astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="wire dtype"):
        round_trip(x, "bf16")


def test_values_beyond_fp16_range_raise_instead_of_becoming_inf():
    with pytest.raises(ValueError, match=r"beyond the fp16 range.*--wire-dtype fp32"):
        round_trip({"w": np.array([70000.0])}, "fp16")
    assert round_trip({"w": np.array([70000.0])}, "fp32")["w"][0] == 70000.0


def test_upload_reference_divides_b_by_scale_and_skips_local_factors():
    init = {"m": LoraFactors(A=np.ones((2, 3)), B=np.full((4, 2), 6.0))}
    ref = upload_reference(init, 2.0, local=())
    np.testing.assert_array_equal(ref[peft_key("m", "B")], np.full((4, 2), 3.0))
    assert set(upload_reference(init, 2.0, local=("B",))) == {peft_key("m", "A")}


def test_a_blob_claiming_a_huge_shape_is_refused_before_allocation():
    """A 29-byte blob whose header claims a 2^22 x 2^22 tensor (64 TiB of fp32) is refused
    against the receiver's expected shape, before anything is allocated."""
    bomb = np.concatenate([np.array([2, 2**22, 2**22, 1, 0], dtype=np.uint32).view(np.uint8),
                           np.zeros(9, dtype=np.uint8)])
    assert bomb.size == 29
    with pytest.raises(ValueError, match="claims shape"):
        decompress(bomb, expected=(4, 8))
    with pytest.raises(ValueError, match="unexpected compressed array"):
        decompress_arrays({"x.lora_A.weight" + COMPRESSED_SUFFIX: bomb}, {}, shapes={})
