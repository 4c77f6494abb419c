"""GGUF tensors read by parts, for tensor-parallel ranks: a rank reads and dequantizes only the rows or columns it
holds, never the whole tensor (the file is memory-mapped, so bytes not sliced are never read).

A quantized GGUF tensor is stored row by row (a row: one output feature), each row as consecutive blocks of
block_size weights along the input features. So:
- rows (column-parallel projections, the vocabulary) are whole rows of bytes: sliced, then dequantized;
- columns (row-parallel projections) are sliced on block boundaries, then dequantized, when the cut falls on
  one; a cut inside a block (a 256-wide K-quant block cut at SmolLM2's 192 features, say) cannot be dequantized
  apart from the rest of its block, so those rows are dequantized whole and narrowed;
- q / k rows (llama.cpp's rotary permutation, undone per head) are sliced on head boundaries, which a rank's
  heads always are; any other row range is un-permuted whole, then narrowed.
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
from gguf.quants import dequantize

from engine_svc.loader.gguf_loader import dequantized_tensor, rotary_heads, unpermute_rotary
from engine_svc.model_config import ModelConfig

_FLOAT = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)


class GGUFTensorPart:
    """One GGUF tensor in HF's layout ([rows, columns], q/k un-permuted), indexed as a safetensors slice is:
    t[a:b] (rows), t[:, a:b] (columns), t[:] (all); each returns float32."""

    def __init__(self, t: ReaderTensor, name: str, cfg: ModelConfig) -> None:
        self._t, self._name, self._cfg = t, name, cfg
        self.shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        self._heads = rotary_heads(name, cfg)

    def get_shape(self) -> tuple[int, ...]:
        return self.shape

    def __getitem__(self, index) -> torch.Tensor:
        if index == slice(None):
            return dequantized_tensor(self._t, self._name, self._cfg)
        if isinstance(index, slice):
            return self._rows(*_bounds(index, self.shape[0]))
        rows, cols = index
        if rows != slice(None) or len(self.shape) != 2:
            raise IndexError(f"{self._name}: a GGUF part is rows [a:b] or columns [:, a:b], not {index!r}")
        return self._columns(*_bounds(cols, self.shape[1]))

    def _rows(self, a: int, b: int) -> torch.Tensor:
        per_head = self.shape[0] // self._heads if self._heads else 1
        if a % per_head or b % per_head:
            return dequantized_tensor(self._t, self._name, self._cfg)[a:b]
        w = self._dequantized(np.asarray(self._t.data)[a:b], b - a)
        if self._heads:
            w = unpermute_rotary(w, (b - a) // per_head)
        return _torch(w)

    def _columns(self, a: int, b: int) -> torch.Tensor:
        raw = np.asarray(self._t.data)
        qtype = self._t.tensor_type
        if qtype in _FLOAT:
            return _torch(self._dequantized(raw[:, a:b], self.shape[0]))
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if a % block or b % block:   # a block straddles the cut: see the module docstring
            return dequantized_tensor(self._t, self._name, self._cfg)[:, a:b]
        part = raw[:, a // block * block_bytes:b // block * block_bytes]
        w = self._dequantized(part, self.shape[0])
        if self._heads:   # the rows of q / k are all here: un-permute them as a whole tensor's
            w = unpermute_rotary(w, self._heads)
        return _torch(w)

    def _dequantized(self, raw: np.ndarray, rows: int) -> np.ndarray:
        w = dequantize(raw, self._t.tensor_type).astype(np.float32, copy=False)
        return w.reshape(rows, -1) if len(self.shape) == 2 else w.reshape(-1)


def _bounds(index: slice, n: int) -> tuple[int, int]:
    start, stop, step = index.indices(n)
    if step != 1:
        raise IndexError("a GGUF part is a contiguous range")
    return start, stop


def _torch(w: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(w, dtype=np.float32, order="C"))
