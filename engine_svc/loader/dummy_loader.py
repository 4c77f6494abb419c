"""Random weights at a config's real shapes, for benchmarks: throughput does not depend on the values."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def fill_random(model: nn.Module, seed: int = 0) -> None:
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        gen = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            # Small values keep activations finite through many layers in fp16/bf16.
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32).mul_(0.02))
