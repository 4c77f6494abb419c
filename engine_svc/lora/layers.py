"""LoRALinear: wraps one projection of a decoder layer (nn.Linear or any module mapping [T, in] -> [T, out], a
quantized one included) and adds each token's adapter update to its output. Fused projections are handled slice by
slice (q|k|v, gate|up): each slice has its own A and B, stacked in one tensor per projection.

Under tensor parallelism a column-parallel projection (qkv, gate_up) holds the whole A and the rows of B of its
output rows; a row-parallel one (o, down) holds the columns of A of its input features and the whole B, and adds
its update x_r @ A_r^T @ B^T to its share of the output before the all-reduce: the sum over the ranks is
x @ A^T @ B^T, the single process's update (the manager cuts A and B so)."""
from __future__ import annotations

import torch
from torch import nn

from engine_svc.distributed.layers import RowParallel
from engine_svc.lora.batch import LoRABatch
from engine_svc.lora.torch_ops import add_lora_torch


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, in_features: int, slice_sizes: list[int], r_max: int, batch: LoRABatch,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.base = base
        self.in_features = in_features
        self.slice_sizes = tuple(slice_sizes)
        self.r_max = r_max
        self.batch = batch
        # Slot tensors, written by the LoRAManager: slice j of slot l has A in lora_a[l, j*R : j*R + rank] and B in
        # lora_b[l, bounds[j]:bounds[j+1], :rank], scaling folded into B; everything else is zero.
        n = batch.max_loras
        self.register_buffer("lora_a", torch.zeros(n, len(slice_sizes) * r_max, in_features, device=device,
                                                   dtype=dtype), persistent=False)
        self.register_buffer("lora_b", torch.zeros(n, sum(slice_sizes), r_max, device=device, dtype=dtype),
                             persistent=False)
        bounds = [0]
        for s in slice_sizes:
            bounds.append(bounds[-1] + s)
        self.register_buffer("slice_bounds", torch.tensor(bounds, dtype=torch.int32, device=device),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.base, RowParallel):
            return self.base.finish(self.add_update(x, self.base.partial(x)))
        return self.add_update(x, self.base(x))

    def add_update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y += each token's adapter update, in place; returns y."""
        b = self.batch
        if not b.active:
            return y
        x2 = x.reshape(-1, self.in_features)
        y2 = y.view(-1, y.shape[-1])
        t = b.tensors
        if b.use_kernel:
            from engine_svc.kernels.lora_sgmv import add_lora
            add_lora(y2, x2.contiguous(), self.lora_a, self.lora_b, b.slot_ranks, self.slice_bounds,
                     t["lora_sorted_tokens"], t["lora_tile_start"], t["lora_tile_len"], t["lora_tile_slot"])
        else:
            add_lora_torch(y2, x2, self.lora_a, self.lora_b, t["lora_token_slots"], self.slice_sizes)
        return y
