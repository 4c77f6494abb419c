"""GemvLinear: a float32 linear that also holds its weight in GGUF blocks (engine_svc.quant.gguf_gemv) and
multiplies a single row (batch-1 decode, the CPU's memory-bound case) with the compiled block GEMV. Several rows
(prefills, batched decodes, verify rows) go to F.linear on the float32 weight, which the BLAS's GEMM runs at
compute speed. Both forms hold the same weights (the loader widens the float32 weight from the blocks' exact int4
form, engine_svc.loader.gguf_gemv_serving), so the two paths differ only in float32 rounding."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.quant.compiled_kernels import Kernel, compile_kernel
from engine_svc.quant.gguf_gemv import GEMV_FUNCTIONS, GemvBlocks


class GemvLinear(nn.Module):
    """Buffers: weight float32 [N, K] (a parameter shared with a tied embedding stays that parameter), bias [N]
    or None, and the blocks' tensors. kernel: the compiled GEMV; until compile() sets it, every row count uses
    F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, blocks: GemvBlocks) -> None:
        super().__init__()
        if (blocks.out_features, blocks.in_features) != tuple(weight.shape):
            raise ValueError(f"GEMV blocks of {blocks.out_features} x {blocks.in_features} for a weight of "
                             f"{tuple(weight.shape)}")
        if isinstance(weight, nn.Parameter):
            self.weight = weight
        else:
            self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.kind = blocks.kind
        self.block_names = tuple(f"gemv_{i}" for i in range(len(blocks.tensors)))
        for name, t in zip(self.block_names, blocks.tensors):
            self.register_buffer(name, t)
        self.kernel: Kernel | None = None

    @property
    def blocks(self) -> GemvBlocks:
        return GemvBlocks(self.kind, tuple(getattr(self, n) for n in self.block_names))

    def compile(self) -> None:
        """Compiles the GEMV for this layer's shapes (shared with every layer of the same shapes)."""
        x = torch.zeros(self.weight.shape[1], dtype=torch.float32)
        self.kernel = compile_kernel(GEMV_FUNCTIONS[self.kind], (x, *self.blocks.tensors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None or x.shape[0] != 1:
            return F.linear(x, self.weight, self.bias)
        y = self.kernel(x.reshape(-1), *(getattr(self, n) for n in self.block_names)).view(1, -1)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        n, k = self.weight.shape
        return f"in_features={k}, out_features={n}, blocks={self.kind}, compiled={self.kernel is not None}"
