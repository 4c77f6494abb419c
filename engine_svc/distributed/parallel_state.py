"""The tensor-parallel group and the pipeline stage a model is built for. Layers read current_tp() and current_pp()
while they are constructed (the loader builds the model inside `building_for(tp, pp)`), so the family constructors
keep their (cfg, backend) signature. SINGLE (size 1) and SINGLE_STAGE are the defaults: no collective is ever called
on them."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from engine_svc.distributed.pipeline import SINGLE_STAGE, PipelineStage

@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: Any = None          # a torch.distributed ProcessGroup when size > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks, in place; returns x."""
        import torch.distributed as dist
        dist.all_reduce(x, group=self.group)
        return x

    def max_(self, x: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of x over the ranks, in place; returns x."""
        import torch.distributed as dist
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's x (same shape on all) along the last dimension, in rank order."""
        import torch.distributed as dist
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_from_driver(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (in place); returns x."""
        import torch.distributed as dist
        dist.broadcast(x, src=0, group=self.group)
        return x



def min_over_all_ranks(value: int) -> int:
    """The smallest value any rank of the default group (every tensor-parallel rank of every stage) holds."""
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


SINGLE = TensorParallel()
_current: tuple[TensorParallel, PipelineStage] = (SINGLE, SINGLE_STAGE)


def current_tp() -> TensorParallel:
    return _current[0]


def current_pp() -> PipelineStage:
    return _current[1]


@contextlib.contextmanager
def building_for(tp: TensorParallel, pp: PipelineStage = SINGLE_STAGE) -> Iterator[None]:
    global _current
    previous, _current = _current, (tp, pp)
    try:
        yield
    finally:
        _current = previous
