"""The torch path of batched LoRA (the reference, and the CPU path): tokens grouped by slot, one pair of matmuls
per adapter in the step. Same layout as engine_svc.kernels.lora_sgmv: A [L, S*R, in], B [L, out, R]; padded ranks
hold zeros, so they add nothing."""
from __future__ import annotations

import torch


def add_lora_torch(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
                   slice_sizes: tuple[int, ...]) -> None:
    """y[t] += x[t] @ A[slot]^T @ B[slot]^T per slice, for every token t with token_slots[t] >= 0; in place."""
    r_max = b.shape[2]
    for slot in torch.unique(token_slots).tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        shrunk = x[rows] @ a[slot].t()                       # [n, S * R]
        delta = torch.cat([shrunk[:, j * r_max:(j + 1) * r_max] @ b_j.t()
                           for j, b_j in enumerate(b[slot].split(list(slice_sizes)))], dim=1)
        y.index_add_(0, rows, delta.to(y.dtype))
