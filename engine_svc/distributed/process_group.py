"""Joins a rank to the engine's process groups: the default group carries the model's collectives (NCCL on CUDA,
gloo on the CPU, with the collective timeout) and a second, gloo, group carries the per-step broadcast (CPU
tensors; no timeout, since idle workers wait on it)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from engine_svc.config import EngineConfig
from engine_svc.distributed.parallel_state import TensorParallel
from engine_svc.worker.step_broadcast import IDLE_TIMEOUT, StepChannel


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to join: the engine's config, its rank, and where rank 0 listens."""
    config: EngineConfig
    rank: int
    init_method: str
    device_type: str          # "cuda" or "cpu": picks NCCL or gloo
    parent_pid: int
    device_index: int | None = None   # the CUDA device this rank uses; None: its rank (one node, all GPUs seen)

    @property
    def world_size(self) -> int:
        return self.config.tensor_parallel_size


def free_init_method(host: str = "127.0.0.1") -> str:
    """Where rank 0 listens: a free port on host (this node's address when ranks join from other nodes)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def cpu_threads_per_rank(world_size: int) -> int:
    """On the CPU the ranks share the cores: each gets its share, so T ranks do not oversubscribe them."""
    return max(1, len(os.sched_getaffinity(0)) // world_size)


def join(spec: RankSpec) -> tuple[TensorParallel, StepChannel]:
    import torch.distributed as dist

    if spec.device_type == "cuda":
        torch.cuda.set_device(spec.rank if spec.device_index is None else spec.device_index)
    else:
        torch.set_num_threads(cpu_threads_per_rank(spec.world_size))
    backend = "nccl" if spec.device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=spec.init_method, rank=spec.rank, world_size=spec.world_size,
                            timeout=timedelta(seconds=spec.config.distributed_timeout_s))
    plan_group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    extra = ()
    if spec.config.enable_lora:
        from engine_svc.lora.batch import FIELDS
        extra = tuple(FIELDS)
    return (TensorParallel(spec.rank, spec.world_size, dist.group.WORLD),
            StepChannel(plan_group, spec.rank, extra))


def leave() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
