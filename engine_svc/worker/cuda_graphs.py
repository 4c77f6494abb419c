"""CUDA graphs of the model runner's decode and verify steps, one per GraphShape (engine_svc.worker.graph_layout:
which shape a step runs in, and how its inputs are padded to it).

A graph runs the model over the persistent input tensors (InputBuffers) sized to its shape, with every length read
on the device: the attention kernels size their grids from the shape and max_model_len alone.

Graphs are captured largest first in one memory pool: steps run one at a time, so a replay's intermediates may reuse
the memory of any other graph's. Every graph copies its logits into one static output tensor, read before the next
replay, so the graphs' outputs do not each keep memory of their own (a pool holds a captured output for as long as
its graph lives). Without capture (CPU, tests) the same padded buffers run eagerly, so the choice of shapes and the
padding are exercised without a GPU.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from engine_svc.attention import AttentionMetadata
from engine_svc.worker.graph_layout import GraphShape, pad_step
from engine_svc.worker.input_buffers import HostStep, InputBuffers

_LOG = logging.getLogger("tandem.engine.cuda_graphs")


class StepGraphs:
    def __init__(self, run: Callable[[GraphShape], torch.Tensor], shapes: list[GraphShape], capture: bool,
                 prime: Callable[[GraphShape], None] = lambda shape: None) -> None:
        """run(shape) computes the logits of the shape's logits_rows from the static inputs; prime(shape) fills
        those inputs with an inert step of the shape (no KV writes, valid lengths) before its capture."""
        self.shapes = sorted(shapes, key=lambda s: (s.num_tokens, s.width))
        self._run = run
        self._prime = prime
        self._graphs: dict[GraphShape, torch.cuda.CUDAGraph] = {}
        self._out: torch.Tensor | None = None
        if capture:
            self._capture()

    def run(self, shape: GraphShape) -> torch.Tensor:
        """Logits [shape.num_tokens, vocab] of the padded step (a view of the static output when captured)."""
        graph = self._graphs.get(shape)
        if graph is None:
            return self._run(shape)
        graph.replay()
        return self._out[:shape.num_tokens]

    def _capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for shape in reversed(self.shapes):
            self._prime(shape)
            out = self._run(shape)            # compiles the kernels and warms the allocator outside the graph
            if self._out is None:             # the largest shape comes first
                self._out = torch.empty_like(out)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._out[:shape.num_tokens].copy_(self._run(shape))
            pool = graph.pool()
            self._graphs[shape] = graph
        torch.cuda.synchronize()
        widths = sorted({s.width for s in self.shapes})
        _LOG.info("captured %d CUDA graphs (batch sizes %d..%d, tokens per row %s) in %.1f s", len(self.shapes),
                  min(s.batch for s in self.shapes), max(s.batch for s in self.shapes),
                  ", ".join(map(str, widths)), time.perf_counter() - start)


def runner_graphs(runner, buffers: InputBuffers, shapes: list[GraphShape], capture: bool) -> StepGraphs:
    """The graphs of a model runner's steps of the given shapes, over its persistent input buffers (large enough
    for every shape)."""
    if runner.backend.name != "triton" and any(s.width > 1 for s in shapes):
        raise ValueError("verify graphs need the triton attention backend (the torch backend reads the length of a "
                         "row of several tokens on the host)")
    dev, width = buffers.device_tensors, buffers.max_blocks_per_seq
    lora, model, max_len = runner.lora, runner.model, runner.max_model_len

    def prime(shape: GraphShape) -> None:
        empty = HostStep([], [], [], [], [0], [], [], width, [], [])
        host = pad_step(empty, shape, width)
        if lora is not None:
            runner.plan_lora(host, [])
        buffers.load(host)

    def run(shape: GraphShape) -> torch.Tensor:
        b, n = shape.batch, shape.num_tokens
        meta = AttentionMetadata(
            slot_mapping=dev["slot_mapping"][:n], block_tables=dev["block_tables"][:b * width].view(b, width),
            seq_lens=dev["seq_lens"][:b], query_start=dev["query_start"][:b + 1], query_lens_cpu=[shape.width] * b,
            seq_lens_cpu=[max_len] * b, block_size=runner.block_size, max_seq_len=max_len)
        if lora is not None:   # the graph holds the LoRA kernels; replays read the plan prepare() wrote
            lora.batch.bind(dev, n, active=True)
        hidden = model(dev["input_ids"][:n], dev["positions"][:n], runner.kv_caches, meta)
        return model.compute_logits(hidden[dev["logits_rows"][:n]])

    with torch.inference_mode():
        return StepGraphs(run, shapes, capture, prime)

