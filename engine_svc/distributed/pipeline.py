"""Pipeline parallelism: where the stages sit among the ranks, which layers each holds, and the point-to-point link
that carries a step's activations from one stage to the next.

Rank layout (T tensor-parallel ranks per stage, P stages, T x P ranks): ranks 0..T-1 hold the LAST stage, ranks
T..2T-1 stage 0, 2T..3T-1 stage 1, and so on. Rank 0 is the driver in the engine process; holding the last stage
there puts the logits beside the sampler and the scheduler, so only hidden states cross processes, never logits
(a [batch, vocabulary] float32 tensor) and never sampled ids. At P = 1 the layout is the plain tensor-parallel one.

Layers: L layers split into P contiguous runs of L // P, the first L % P stages taking one more (the last stage
also runs lm_head and the sampler, so it never holds the larger share). Stage 0 also holds the embedding, the last
stage the final norm and lm_head.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from torch import nn



def stage_of(rank: int, tp_size: int, pp_size: int) -> int:
    return (rank // tp_size - 1) % pp_size


def rank_of(stage: int, tp_rank: int, tp_size: int, pp_size: int) -> int:
    return (stage + 1) % pp_size * tp_size + tp_rank


def stage_ranks(stage: int, tp_size: int, pp_size: int) -> list[int]:
    return [rank_of(stage, t, tp_size, pp_size) for t in range(tp_size)]


@dataclass(frozen=True)
class PipelineStage:
    """One rank's place in the pipeline. SINGLE_STAGE (size 1) holds every layer and sends nothing."""
    stage: int = 0
    size: int = 1
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.size - 1

    @property
    def prev_rank(self) -> int:
        """The rank this one receives its activations from (same tensor-parallel index, previous stage)."""
        return rank_of(self.stage - 1, self.tp_rank, self.tp_size, self.size)

    @property
    def next_rank(self) -> int:
        return rank_of(self.stage + 1, self.tp_rank, self.tp_size, self.size)

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        if self.size > num_layers:
            raise ValueError(f"--pipeline-parallel-size {self.size} exceeds the model's {num_layers} layers "
                             f"(every stage needs at least one)")
        base, extra = divmod(num_layers, self.size)
        start = self.stage * base + min(self.stage, extra)
        return start, start + base + (self.stage < extra)

    def describe(self, num_layers: int) -> str:
        start, stop = self.layer_range(num_layers)
        return f"pipeline stage {self.stage} of {self.size}: layers {start}-{stop - 1}"


SINGLE_STAGE = PipelineStage()


@dataclass(frozen=True)
class StageNames:
    """A family's checkpoint prefixes, for routing its tensors to the pipeline stage that holds them."""
    layers: str                   # "model.layers." (followed by the layer index)
    embedding: str                # "model.embed_tokens."
    last_stage: tuple[str, ...]   # the final norm's and lm_head's prefixes

    def on_stage(self, name: str, pp: PipelineStage, layers: tuple[int, int], tied: bool) -> str | None:
        """The name the checkpoint tensor `name` loads under on stage pp (holding `layers`), None when another
        stage holds it (it is then never read): the stage's layers, the embedding on the first stage, the final
        norm and lm_head on the last, and there, with tied embeddings, the embedding's tensor as lm_head's own."""
        if pp.size == 1:
            return name
        if name.startswith(self.layers):
            layer = int(name[len(self.layers):].split(".", 1)[0])
            return name if layers[0] <= layer < layers[1] else None
        if name.startswith(self.embedding):
            if pp.is_last and tied:
                return "lm_head." + name.removeprefix(self.embedding)
            return name if pp.is_first else None
        if name.startswith(self.last_stage):
            return name if pp.is_last else None
        return name


class MissingLayer(nn.Module):
    """Stands in for a decoder layer another stage holds: the layer indices, and so the checkpoint's names, stay
    global; it has no parameters and is never called."""


class StageLink:
    """Carries activations ([streams, tokens, hidden]: the model's stage_streams, for Llama the hidden states and
    the residual stream) from this rank to the next stage's rank of the same tensor-parallel index, over the
    default process group (gloo on the CPU, NCCL on CUDA). Messages between two ranks arrive in the order sent,
    which is every rank's order of plans.

    Sends are asynchronous: a stage goes on to its next plan while the next stage is still busy. A send is waited
    on (and its tensor freed) once more than `depth` are outstanding; with at most `depth` batches in flight the
    oldest has been received by then."""

    def __init__(self, stage: PipelineStage, depth: int) -> None:
        self.stage = stage
        self.depth = depth
        self._sends: deque = deque()   # (work, tensor) of sends not yet waited on

    def send(self, x: torch.Tensor) -> None:
        import torch.distributed as dist
        x = x.contiguous()
        self._sends.append((dist.isend(x, dst=self.stage.next_rank), x))
        while len(self._sends) > self.depth:
            self._sends.popleft()[0].wait()

    def irecv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> "PendingActivations":
        import torch.distributed as dist
        buf = torch.empty(shape, dtype=dtype, device=device)
        return PendingActivations(dist.irecv(buf, src=self.stage.prev_rank), buf)

    def flush(self) -> None:
        while self._sends:
            self._sends.popleft()[0].wait()


class PendingActivations:
    def __init__(self, work, buf: torch.Tensor) -> None:
        self._work, self._buf = work, buf

    def wait(self) -> torch.Tensor:
        self._work.wait()
        return self._buf
