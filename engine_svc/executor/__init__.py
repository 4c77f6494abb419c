"""The seam between the engine (scheduler, request state, outputs) and the workers that hold the model.

An executor has `driver`, the ModelRunner in the engine process (rank 0: it builds each step's plan and samples),
`launch(out)` / `execute(out)` / `forward_logits(out)` like a runner's, and `shutdown()`:
- UniProcExecutor: one process, one runner; its methods are the runner's own (no added call).
- MultiprocExecutor: ranks 1..T x P - 1 (tensor-parallel ranks of pipeline stages) in worker processes, rank 0
  in the engine process.
- RayExecutor: the same ranks in Ray actors, on this node or others of a Ray cluster (Ray is imported only here).
"""
from __future__ import annotations

from engine_svc.config import EngineConfig
from engine_svc.executor.uniproc import UniProcExecutor


def make_executor(config: EngineConfig):
    if config.world_size == 1:
        return UniProcExecutor(config)
    if config.distributed_executor == "ray":
        from engine_svc.executor.ray_executor import RayExecutor
        return RayExecutor(config)
    from engine_svc.executor.multiproc import MultiprocExecutor
    return MultiprocExecutor(config)


__all__ = ["UniProcExecutor", "make_executor"]
