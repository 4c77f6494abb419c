"""One step's forward as every tensor-parallel rank runs it: the host inputs and how to run them. The driver builds
it from the scheduler's output; the other ranks receive it packed (step_broadcast) and run the same forward."""
from __future__ import annotations

from dataclasses import dataclass

from engine_svc.worker.graph_layout import GraphShape
from engine_svc.worker.input_buffers import HostStep


@dataclass
class StepPlan:
    host: HostStep
    graph: GraphShape | None = None   # the graph the step is padded to (graph_layout); None: eager
    num_real: int = 0              # scheduled sequences (the rest of the rows are a graph's padding)
    num_logits: int = 0            # logits rows the step samples from (the first of a graph's)
    prompt_rows: tuple[int, ...] = ()   # rows scored for prompt logprobs
    lora_active: bool = False      # some row uses an adapter
