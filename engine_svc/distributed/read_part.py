"""This rank's part of a checkpoint tensor. Under tensor parallelism the safetensors loader yields lazy slices
(safetensors' get_slice), so a rank reads only the bytes of its rows or columns; a torch tensor (GGUF, dequantized
whole, or a single-process load) is narrowed instead."""
from __future__ import annotations

import torch


def read_part(tensor, part: tuple[int, int, int] | None) -> torch.Tensor:
    """part: (dim, start, stop) along dim 0 (rows) or 1 (columns), or None for the whole tensor."""
    if isinstance(tensor, torch.Tensor):
        return tensor if part is None else tensor.narrow(part[0], part[1], part[2] - part[1])
    if part is None:
        return tensor[:]
    dim, start, stop = part
    return tensor[start:stop] if dim == 0 else tensor[:, start:stop]
