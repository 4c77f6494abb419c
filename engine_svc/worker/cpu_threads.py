"""How many torch threads the engine runs with on the CPU.

Under `tandem serve` the engine shares the machine's cores with the gateway and the tokenizer, which work on every
token. A batch-1 decode step is a chain of small ops and GEMVs; with a second thread each parallel op forks and
joins, and whenever another process holds the other core the join waits for a scheduler time slice (measured on
this 2-core machine type with other jobs running: a 0.1 ms KV gather took 12 ms, and a step's compiled GEMVs 38 ms
instead of 13). So the GEMV path (engine_svc.loader.gguf_gemv_serving) runs on one thread unless --cpu-threads
says otherwise; other paths keep torch's default. Tensor-parallel ranks take their share of the cores instead
(engine_svc.distributed.process_group)."""
from __future__ import annotations

import torch

from engine_svc.config import EngineConfig

GEMV_PATH_THREADS = 1


def set_cpu_threads(config: EngineConfig, device: torch.device, gemv_path: bool) -> None:
    """Before the model loads: inductor bakes the thread count into the kernels it compiles."""
    if device.type != "cpu" or config.world_size > 1:
        return
    threads = config.cpu_threads or (GEMV_PATH_THREADS if gemv_path else None)
    if threads:
        torch.set_num_threads(threads)
