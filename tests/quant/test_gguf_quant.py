"""GGUF Q4_0 / Q4_1 / Q8_0 blocks -> int4 / int8, compared with gguf's own dequantize (the reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from engine_svc.loader.gguf_loader import unpermute_rotary
from engine_svc.quant.gguf_quant import q4_to_int4, q8_0_to_int8
from engine_svc.quant.int4_format import dequantize_int4
from engine_svc.quant.int8_format import dequantize_int8


def _weights(n: int, k: int, seed: int) -> np.ndarray:
    w = np.random.default_rng(seed).normal(0.0, 0.05, size=(n, k)).astype(np.float32)
    w[0, :32] = 0.0      # an all-zero block (d = 0)
    w[1, 32:64] = 0.25   # a constant block
    return w


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1])
@pytest.mark.parametrize("n,k", [(8, 64), (12, 160)])
def test_q4_blocks_match_gguf_dequantize_exactly(qtype, n, k):
    raw = quantize(_weights(n, k, seed=n + k), qtype)
    assert raw.dtype == np.uint8 and raw.shape[0] == n
    qweight, scales, offsets = q4_to_int4(raw, qtype)
    assert qweight.shape == (n, k // 2) and scales.shape == offsets.shape == (n, k // 32)
    ref = torch.from_numpy(dequantize(raw, qtype).reshape(n, k).astype(np.float32))
    assert torch.equal(dequantize_int4(qweight, scales, offsets, 32), ref)


def test_q4_nibble_order_low_nibbles_first():
    # one Q4_1 block by hand: d = 1, m = 0, byte j = (j) | (15 - j) << 4 -> weights 0..15 then 15..0
    block = np.zeros((1, 20), dtype=np.uint8)
    block[0, 0:2] = np.array([1.0], dtype=np.float16).view(np.uint8)
    block[0, 4:] = np.arange(16, dtype=np.uint8) | ((15 - np.arange(16, dtype=np.uint8)) << 4)
    qweight, scales, offsets = q4_to_int4(block, T.Q4_1)
    w = dequantize_int4(qweight, scales, offsets, 32)[0]
    assert w.tolist() == list(range(16)) + list(range(15, -1, -1))


def test_q4_row_permutation_applies_to_all_three_tensors():
    n, k, heads = 16, 64, 2
    raw = quantize(_weights(n, k, seed=5), T.Q4_1)
    ours = [unpermute_rotary(t, heads) for t in q4_to_int4(raw, T.Q4_1)]
    ref = unpermute_rotary(dequantize(raw, T.Q4_1).reshape(n, k), heads)
    assert torch.equal(dequantize_int4(*ours, 32), torch.from_numpy(np.ascontiguousarray(ref)))


def test_q8_0_requantization_error_bound():
    n, k = 8, 128
    raw = quantize(_weights(n, k, seed=11), T.Q8_0)
    q, scale = q8_0_to_int8(raw)
    assert q.dtype == torch.int8 and q.shape == (n, k) and scale.shape == (n,)
    ref = torch.from_numpy(dequantize(raw, T.Q8_0).reshape(n, k))
    err = (dequantize_int8(q, scale) - ref).abs().amax(dim=1)
    assert torch.all(err <= scale / 2 * (1 + 1e-6))
    d = torch.from_numpy(raw.reshape(n, -1, 34)[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    assert torch.equal(scale, d.amax(dim=1))     # rows scale onto their largest block scale


def test_q8_0_rows_with_one_block_scale_are_exact():
    n, nb = 4, 3
    rng = np.random.default_rng(0)
    blocks = np.zeros((n, nb, 34), dtype=np.uint8)
    blocks[..., 0:2] = np.array([0.0123], dtype=np.float16).view(np.uint8)
    blocks[..., 2:] = rng.integers(-127, 128, size=(n, nb, 32), dtype=np.int8).view(np.uint8)
    raw = blocks.reshape(n, nb * 34)
    q, scale = q8_0_to_int8(raw)
    ref = torch.from_numpy(dequantize(raw, T.Q8_0).reshape(n, nb * 32))
    assert torch.equal(dequantize_int8(q, scale), ref)


def test_wrong_types_and_sizes_are_refused():
    with pytest.raises(ValueError, match="Q8_0 does not map onto int4"):
        q4_to_int4(np.zeros((2, 34), dtype=np.uint8), T.Q8_0)
    with pytest.raises(ValueError, match="multiple of 20 bytes"):
        q4_to_int4(np.zeros((2, 30), dtype=np.uint8), T.Q4_1)
    with pytest.raises(ValueError, match="multiple of 34 bytes"):
        q8_0_to_int8(np.zeros((2, 36), dtype=np.uint8))
