"""Compact transport of adapters: fp16 on the wire and ComPEFT-style upload compression.

ComPEFT (Yadav et al., arXiv 2311.13171; docs/algorithms.md §8): keep the top-k entries
of the task vector tau = params - init by magnitude and send only their signs and one
scale per tensor, tau_c = alpha * sign(tau) * mask, with alpha the mean magnitude of the
kept entries (the "STC-style" choice of the reference code, ``replace_factor = -2``).
Under per-silo DP-SGD this is post-processing of the released adapter: no privacy cost.

Encoding of one compressed tensor, a single uint8 array (one Flower `Array` per tensor):
``header (ndim, shape..., k, layout as uint32; scale as float32) | positions | signs
(np.packbits)``. The positions of the kept entries take the smaller of two layouts: their
indices (16 or 32 bits each: sparse tensors) or a bitmask over all entries (1 bit each:
densities above ~1/16), so a tensor costs about min(17 k, n + k) bits instead of 32 n.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from silotune.adapters.types import LoraFactors, peft_key

WIRE_DTYPES: dict[str, type[np.floating]] = {"fp16": np.float16, "fp32": np.float32}
COMPRESSED_SUFFIX = "#topk"


def round_trip(arrays: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """What a receiver decodes (fp32) from `arrays` sent as `dtype` ("fp16" or "fp32"):
    the sender applies this to its own copy so that both sides stay identical."""
    return {k: cast_for_wire(k, v, dtype).astype(np.float32) for k, v in arrays.items()}


def cast_for_wire(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """`array` as `dtype`; raises instead of silently turning large values into inf."""
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype '{dtype}'; valid: {', '.join(WIRE_DTYPES)}")
    source = np.asarray(array)
    limit = np.finfo(WIRE_DTYPES[dtype]).max
    if source.size and np.isfinite(source).all() and np.abs(source).max() > limit:
        raise ValueError(f"'{name}' holds values beyond the {dtype} range (|x| > {limit:.0f}); "
                         "use --wire-dtype fp32")
    return np.ascontiguousarray(source, dtype=WIRE_DTYPES[dtype])


def compress(tau: np.ndarray, density: float) -> np.ndarray:
    """Top-k (k = ceil(density * size)) ternary encoding of `tau` as one uint8 array."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"compression density must be in (0, 1], got {density}")
    flat = np.asarray(tau, dtype=np.float32).ravel()  # (n,)
    k = max(1, int(np.ceil(density * flat.size)))
    idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:])  # (k,)
    kept = flat[idx]
    scale = np.float32(np.abs(kept).mean())
    index_dtype = _index_dtype(flat.size)
    if k * np.dtype(index_dtype).itemsize <= (flat.size + 7) // 8:
        layout, positions = _INDICES, idx.astype(index_dtype).view(np.uint8)
    else:
        mask = np.zeros(flat.size, dtype=bool)
        mask[idx] = True
        layout, positions = _BITMASK, np.packbits(mask)
    header = np.array([tau.ndim, *tau.shape, k, layout], dtype=np.uint32)
    return np.concatenate([
        header.view(np.uint8), np.array([scale], dtype=np.float32).view(np.uint8),
        positions, np.packbits(kept > 0)])


def decompress(blob: np.ndarray, expected: tuple[int, ...] | None = None) -> np.ndarray:
    """Inverse of `compress`: a dense fp32 array with +-scale at the kept entries.

    `expected`: the shape the receiver allows; a header claiming another shape is refused
    before anything is allocated (a 29-byte blob may not claim a 2^22 x 2^22 tensor)."""
    data = np.ascontiguousarray(blob, dtype=np.uint8)
    corrupt = ValueError("corrupt compressed tensor (bad header, index out of range or "
                         "truncated)")
    if data.size < 4:
        raise corrupt
    ndim = int(data[:4].view(np.uint32)[0])
    pos = 4 * (ndim + 3)
    if ndim > 8 or data.size < pos + 4:
        raise corrupt
    head = data[:pos].view(np.uint32)
    shape = tuple(int(d) for d in head[1: ndim + 1])
    if expected is not None and shape != tuple(expected):
        raise ValueError(f"compressed tensor claims shape {shape}, expected {tuple(expected)}")
    k, layout = int(head[ndim + 1]), int(head[ndim + 2])
    scale = float(data[pos: pos + 4].view(np.float32)[0])
    pos += 4
    size = int(np.prod(shape))
    if layout == _INDICES:
        index_dtype = _index_dtype(size)
        width = np.dtype(index_dtype).itemsize * k
        idx = data[pos: pos + width].view(index_dtype).astype(np.int64)
    elif layout == _BITMASK:
        width = (size + 7) // 8
        idx = np.flatnonzero(np.unpackbits(data[pos: pos + width])[:size])
    else:
        raise corrupt
    signs = np.unpackbits(data[pos + width:])[:k].astype(np.float32) * 2.0 - 1.0
    if idx.size != k or signs.size != k or (k and idx.max() >= size):
        raise corrupt
    out = np.zeros(size, dtype=np.float32)
    out[idx] = scale * signs
    return out.reshape(shape)


_INDICES, _BITMASK = 0, 1  # layouts of the kept entries' positions


def _index_dtype(size: int) -> type[np.unsignedinteger]:
    return np.uint16 if size < 2**16 else np.uint32


def compress_arrays(arrays: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray],
                    density: float) -> dict[str, np.ndarray]:
    """Compress each array's change from `start` (zero where `start` has no entry)."""
    return {k + COMPRESSED_SUFFIX: compress(v - start[k] if k in start else v, density)
            for k, v in arrays.items()}


def decompress_arrays(wire: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray],
                      shapes: Mapping[str, tuple[int, ...]] | None = None,
                      ) -> dict[str, np.ndarray]:
    """Inverse of `compress_arrays`; uncompressed entries pass through unchanged.
    `shapes` (the receiver's expected shape per name) bounds what a blob may claim."""
    out: dict[str, np.ndarray] = {}
    for key, value in wire.items():
        if key.endswith(COMPRESSED_SUFFIX):
            name = key[: -len(COMPRESSED_SUFFIX)]
            if shapes is not None and name not in shapes:
                raise ValueError(f"unexpected compressed array '{name}'")
            tau = decompress(value, shapes[name] if shapes is not None else None)
            out[name] = tau + start[name] if name in start else tau
        else:
            out[key] = value
    return out


def upload_reference(init: Mapping[str, LoraFactors] | None, scale: float,
                     local: tuple[str, ...]) -> dict[str, np.ndarray]:
    """What a silo's uploaded factors started from, as PEFT holds them (B divided by the
    silo's scale s): both sides compute it from the same decoded start, so compressed
    changes decode exactly. Factors kept on the silo (FedSA's B) are sent as they are."""
    reference: dict[str, np.ndarray] = {}
    for module, f in (init or {}).items():
        if "A" not in local:
            reference[peft_key(module, "A")] = np.asarray(f.A, dtype=np.float32)
        if "B" not in local:
            reference[peft_key(module, "B")] = peft_b(f.B, scale)
    return reference


def peft_b(b: np.ndarray, scale: float) -> np.ndarray:
    """B as PEFT holds it for a silo of scale s (B / s, fp32): one definition for the
    silo that loads it and the coordinator that decodes the silo's changes from it."""
    return np.asarray(b, dtype=np.float32) / np.float32(scale)
