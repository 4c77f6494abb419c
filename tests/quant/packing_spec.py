"""Independent packers for the AWQ GEMM and GPTQ layouts, written from the formats' descriptions (AutoAWQ's
WQLinear_GEMM.from_linear, AutoGPTQ's QuantLinear.pack), not from the converters under test: they build the
checkpoint tensors from known integer values so the tests can check the converters recover them."""
from __future__ import annotations

import numpy as np
import torch

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _to_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def awq_pack_along_columns(values: np.ndarray) -> torch.Tensor:
    """[R, C] ints in 0..15 -> int32 [R, C // 8]: slot i of word c takes column 8c + AWQ_PACK_ORDER[i]."""
    rows, cols = values.shape
    words = np.zeros((rows, cols // 8), dtype=np.uint64)
    for c in range(cols // 8):
        for slot, src in enumerate(AWQ_PACK_ORDER):
            words[:, c] |= values[:, 8 * c + src].astype(np.uint64) << np.uint64(4 * slot)
    return _to_int32(words)


def gptq_pack_rows(values: np.ndarray) -> torch.Tensor:
    """[K, N] ints in 0..15 -> int32 [K // 8, N]: word r holds rows 8r .. 8r + 7, row 8r + j at bits 4j."""
    k, n = values.shape
    words = np.zeros((k // 8, n), dtype=np.uint64)
    for r in range(k // 8):
        for j in range(8):
            words[r] |= values[8 * r + j].astype(np.uint64) << np.uint64(4 * j)
    return _to_int32(words)


def gptq_pack_columns(values: np.ndarray) -> torch.Tensor:
    """[G, N] ints in 0..15 -> int32 [G, N // 8]: word c holds columns 8c .. 8c + 7, column 8c + j at bits 4j."""
    g, n = values.shape
    words = np.zeros((g, n // 8), dtype=np.uint64)
    for c in range(n // 8):
        for j in range(8):
            words[:, c] |= values[:, 8 * c + j].astype(np.uint64) << np.uint64(4 * j)
    return _to_int32(words)


def random_layer(n: int, k: int, group: int, seed: int, zero_low: int = 0, zero_high: int = 16):
    """Known integer weights q [N, K], zero points [N, K // G] and fp16 scales [N, K // G] (as fp32), plus the
    reference dequantized weight (q - zero) * scale."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(n, k))
    zeros = rng.integers(zero_low, zero_high, size=(n, k // group))
    scales = rng.uniform(0.001, 0.1, size=(n, k // group)).astype(np.float16).astype(np.float32)
    expanded = lambda a: np.repeat(a, group, axis=1)  # noqa: E731
    ref = torch.from_numpy((q - expanded(zeros)).astype(np.float32) * expanded(scales))
    return q, zeros, scales, ref
