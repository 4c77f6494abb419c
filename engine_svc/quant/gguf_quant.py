"""GGUF Q4_0 / Q4_1 / Q8_0 tensors -> the int4 / int8 formats, from the raw block bytes of one tensor at a time
(the numpy view GGUFReader gives as tensor.data: uint8 [rows, bytes per row]); no tensor is widened to fp32 except
a Q8_0 one while it is requantized.

Block layouts (ggml; checked against gguf.quants' dequantize_blocks, the reference our tests compare with), 32
weights of one row per block:
- Q4_0, 18 bytes: d fp16, then qs[16]; weight j (j < 16) is the low nibble of qs[j] and weight 16 + j its high
  nibble; w = d * (q - 8).        -> int4, group 32: scale d, offset -8 d (exact: a power-of-two multiple).
- Q4_1, 20 bytes: d fp16, m fp16, then qs[16] as in Q4_0; w = d * q + m.  -> int4, group 32: scale d, offset m.
  Both are exact: q * d + offset in float32 is the same arithmetic gguf's dequantize does.
- Q8_0, 34 bytes: d fp16, then 32 int8; w = d * q. Our int8 format has one scale per row, so a row is requantized
  onto its largest block scale D = max d: q' = round(q * d / D), clamped to [-127, 127]. Each weight errs by at
  most D / 2 (D is about the row's max |w| / 127), and a row whose blocks share one d is kept exactly.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from engine_svc.quant.int4_format import pack_int4
from engine_svc.quant.int8_format import INT8_MAX

GGUF_BLOCK = 32
_Q4_BLOCK_BYTES = {GGMLQuantizationType.Q4_0: 18, GGMLQuantizationType.Q4_1: 20}
_Q8_0_BLOCK_BYTES = 34
INT4_GGUF_TYPES = frozenset(_Q4_BLOCK_BYTES)
INT8_GGUF_TYPES = frozenset({GGMLQuantizationType.Q8_0})


def _blocks(raw: np.ndarray, block_bytes: int, kind: str) -> np.ndarray:
    """uint8 [N, bytes per row] -> uint8 [N, K // 32, block_bytes]."""
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] % block_bytes:
        raise ValueError(f"{kind} data must be uint8 [rows, a multiple of {block_bytes} bytes], got "
                         f"{raw.dtype} {raw.shape}")
    return np.ascontiguousarray(raw).reshape(raw.shape[0], -1, block_bytes)


def _fp16_field(blocks: np.ndarray, start: int) -> torch.Tensor:
    """Two bytes at `start` of every block -> float32 [N, K // 32]."""
    return torch.from_numpy(np.ascontiguousarray(blocks[..., start:start + 2]).view(np.float16)[..., 0]).float()


def q4_to_int4(raw: np.ndarray, qtype: GGMLQuantizationType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Q4_0 / Q4_1 tensor's bytes [N, bytes per row] -> (qweight uint8 [N, K // 2], scales f32 [N, K // 32],
    offsets f32 [N, K // 32]) with group size 32."""
    if qtype not in _Q4_BLOCK_BYTES:
        raise ValueError(f"GGUF type {qtype.name} does not map onto int4; supported: Q4_0, Q4_1")
    block_bytes = _Q4_BLOCK_BYTES[qtype]
    blocks = _blocks(raw, block_bytes, qtype.name)
    n, nb, _ = blocks.shape
    d = _fp16_field(blocks, 0)
    offset = -8.0 * d if qtype == GGMLQuantizationType.Q4_0 else _fp16_field(blocks, 2)
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., block_bytes - 16:]))   # [N, nb, 16]
    q = torch.cat([qs & 0xF, qs >> 4], dim=-1)                                     # weights 0..15, then 16..31
    return pack_int4(q.reshape(n, nb * GGUF_BLOCK)).contiguous(), d, offset.contiguous()


def q8_0_to_int8(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """One Q8_0 tensor's bytes [N, bytes per row] -> (q int8 [N, K], scale f32 [N]), requantized per row (see the
    module docstring for the error bound)."""
    blocks = _blocks(raw, _Q8_0_BLOCK_BYTES, "Q8_0")
    n, nb, _ = blocks.shape
    d = _fp16_field(blocks, 0)
    q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8))      # [N, nb, 32]
    row_scale = d.abs().amax(dim=1)
    row_scale = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
    ratio = (d / row_scale[:, None])[..., None]                                    # 1 where a block has D
    q8 = torch.round(q.float() * ratio).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q8.reshape(n, nb * GGUF_BLOCK), row_scale
