"""Joins a rank to the engine's process groups (NCCL on CUDA, gloo on the CPU, with the collective timeout):
- the default group: every rank; the activations between pipeline stages (point to point) and start-up agreement;
- one tensor-parallel group per pipeline stage (its T ranks): the model's collectives;
- the per-step broadcast, over gloo (CPU tensors; no timeout, since idle workers wait on it): one group of every
  rank at P = 1; at P > 1 one per stage, each of the driver and that stage's ranks, so that a stage busy with an
  earlier batch never holds up the plan of another stage (a broadcast's tree may route through any member).

Every rank creates every group, in the same order (torch.distributed requires it)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from engine_svc.config import EngineConfig
from engine_svc.distributed.parallel_state import TensorParallel
from engine_svc.distributed.pipeline import PipelineStage, stage_of, stage_ranks
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
        return self.config.world_size

    @property
    def stage(self) -> PipelineStage:
        t, p = self.config.tensor_parallel_size, self.config.pipeline_parallel_size
        return PipelineStage(stage_of(self.rank, t, p), p, self.rank % t, t)

    def describe(self) -> str:
        """How a failure names this rank."""
        if self.config.pipeline_parallel_size == 1:
            return f"tensor-parallel worker rank {self.rank}"
        s = self.stage
        return (f"worker rank {self.rank} (pipeline stage {s.stage} of {s.size}, tensor-parallel rank {s.tp_rank} "
                f"of {s.tp_size})")


def free_init_method(host: str = "127.0.0.1") -> str:
    """Where rank 0 listens: a free port on host (this node's address when ranks join from other nodes)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def cpu_threads_per_rank(world_size: int) -> int:
    """On the CPU the ranks share the cores: each gets its share, so T ranks do not oversubscribe them."""
    return max(1, len(os.sched_getaffinity(0)) // world_size)


def join(spec: RankSpec) -> tuple[TensorParallel, StepChannel]:
    """This rank's tensor-parallel group and plan channel (its pipeline stage is spec.stage)."""
    import torch.distributed as dist

    if spec.device_type == "cuda":
        torch.cuda.set_device(spec.rank if spec.device_index is None else spec.device_index)
    else:
        torch.set_num_threads(cpu_threads_per_rank(spec.world_size))
    backend = "nccl" if spec.device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=spec.init_method, rank=spec.rank, world_size=spec.world_size,
                            timeout=timedelta(seconds=spec.config.distributed_timeout_s))
    pp = spec.stage
    t, p = pp.tp_size, pp.size
    tp_groups = [dist.new_group(stage_ranks(s, t, p)) for s in range(p)] if p > 1 else [dist.group.WORLD]
    if p == 1:
        plan_groups = [dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)]
    else:
        plan_groups = [dist.new_group(sorted({0, *stage_ranks(s, t, p)}), backend="gloo", timeout=IDLE_TIMEOUT)
                       for s in range(p)]
    extra = ()
    if spec.config.enable_lora:
        from engine_svc.lora.batch import FIELDS
        extra = tuple(FIELDS)
    if spec.rank == 0:   # the driver sends on every plan group (not a singleton: the driver alone at T = 1)
        sends = [g for s, g in enumerate(plan_groups) if len(set(stage_ranks(s, t, p)) | {0}) > 1]
        channel = StepChannel(sends, 0, extra, asynchronous=p > 1)
    else:
        channel = StepChannel([plan_groups[pp.stage]], spec.rank, extra)
    return TensorParallel(pp.tp_rank, t, tp_groups[pp.stage]), channel


def leave() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
