"""How many torch threads the engine uses on the CPU: --cpu-threads N, else torch's own choice (the cores).
Single-row decode work runs on one thread whatever the count (engine_svc.quant.compiled_kernels.one_thread);
prefill and batched steps use the count: their GEMMs gain from it (a 512-token prefill of the default model,
quiet machine: 1.41 s on two threads, 2.01 s on one). Tensor-parallel ranks take their share of the cores
instead (engine_svc.distributed.process_group)."""
from __future__ import annotations

import torch

from engine_svc.config import EngineConfig


def set_cpu_threads(config: EngineConfig, device: torch.device) -> None:
    if device.type == "cpu" and config.world_size == 1 and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
