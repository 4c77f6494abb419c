"""One activation row times a weight kept in GGUF blocks (Q4_0 / Q4_1 / Q8_0, 32 weights of a row per block), in
float32 on the CPU: the batch-1 decode GEMV. The weight is never widened in memory; each block is scaled in
registers, so a step reads 6 (Q4: 4-bit codes, a float32 scale and offset per block) or 9 (Q8) bits per weight
instead of fp32's 32. (The file's fp16 scales, widened once at load: the kernel is compute-bound, not memory-bound.)

Forms (GemvBlocks.kind), each weight row's blocks contiguous as in the file, so rows stream from memory in order
(with rows innermost instead, the compiled loop needs no horizontal sums and wins while the weights sit in cache,
but a decode step's SmolLM2 decoder linears, out of cache, took 15.2 ms against 12.3):
- "q4": codes uint8 [N, K // 32, 16], byte j of a block holding weight j in its low nibble and weight 16 + j in
  its high one (the GGUF order); scales and offsets float32 [N, K // 32]; w = q * scale + offset (Q4_0: offset
  -8 * scale).
- "q8": codes int8 [N, K // 32, 32], scales float32 [N, K // 32]; w = q * scale.

Arithmetic: a block's sum is taken as scale * (q * x) (q4: the two nibbles' products added first) plus offset *
sum(x): equal to sum(x * (q * scale + offset)), the float32 weights the exact path multiplies (q * scale is exact
in float32), up to float32 rounding in another order than the BLAS's. (q4 in this order measured 5% faster than
with x * scale taken first.)

q4_gemv / q8_gemv are the reference, in plain torch ops; engine_svc.quant.compiled_kernels compiles them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine_svc.quant.gguf_quant import _Q8_0_BLOCK_BYTES, GGUF_BLOCK, _blocks, _fp16_field
from engine_svc.quant.int4_format import unpack_int4

_HALF = GGUF_BLOCK // 2


def q4_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x float32 [K] -> [N]; codes, scales, offsets in the "q4" form."""
    xb = x.reshape(codes.shape[1], 2, _HALF)
    low, high = (codes & 15).float(), (codes >> 4).float()
    return ((low * xb[:, 0] + high * xb[:, 1]) * scales[..., None]).sum((1, 2)) + (offsets * xb.sum((1, 2))).sum(1)


def q8_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x float32 [K] -> [N]; codes, scales in the "q8" form."""
    xb = x.reshape(codes.shape[1], GGUF_BLOCK)
    return (codes.float() * (xb * scales[..., None])).sum((1, 2))


GEMV_FUNCTIONS = {"q4": q4_gemv, "q8": q8_gemv}


@dataclass
class GemvBlocks:
    kind: str                        # "q4" | "q8"
    tensors: tuple[torch.Tensor, ...]   # the form's codes, scales (and offsets for q4)

    @property
    def out_features(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def in_features(self) -> int:
        return self.tensors[0].shape[1] * GGUF_BLOCK

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return GEMV_FUNCTIONS[self.kind](x, *self.tensors)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight [N, K] the blocks hold (q * scale + offset per weight)."""
        if self.kind == "q8":
            codes, scales = self.tensors
            return (codes.float() * scales[..., None]).reshape(codes.shape[0], -1)
        codes, scales, offsets = self.tensors
        q = torch.cat([codes & 15, codes >> 4], dim=-1).float()               # [N, K // 32, 32]
        return (q * scales[..., None] + offsets[..., None]).reshape(codes.shape[0], -1)


def q4_blocks(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> GemvBlocks:
    """From the int4 format with group 32 (engine_svc.quant.int4_format: qweight uint8 [N, K // 2], even k in the
    low nibble; scales, offsets [N, K // 32]), which the GGUF loader fills from Q4_0 / Q4_1 blocks exactly."""
    n = qweight.shape[0]
    if scales.shape[1] * GGUF_BLOCK != qweight.shape[1] * 2:
        raise ValueError(f"q4 GEMV blocks need int4 groups of {GGUF_BLOCK}, got {scales.shape[1]} groups for "
                         f"{qweight.shape[1] * 2} input features")
    q = unpack_int4(qweight).reshape(n, -1, GGUF_BLOCK)                         # [N, K // 32, 32]
    codes = q[..., :_HALF] | (q[..., _HALF:] << 4)                              # [N, K // 32, 16]
    return GemvBlocks("q4", (codes.contiguous(), scales.float().contiguous(), offsets.float().contiguous()))


def q8_0_blocks(raw: np.ndarray) -> GemvBlocks:
    """From one Q8_0 tensor's bytes (uint8 [N, bytes per row]: per block an fp16 scale, then 32 int8)."""
    blocks = _blocks(raw, _Q8_0_BLOCK_BYTES, "Q8_0")
    codes = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8))
    return GemvBlocks("q8", (codes, _fp16_field(blocks, 0).contiguous()))
