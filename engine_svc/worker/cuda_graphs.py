"""CUDA graphs for decode steps, one per batch-size bucket.

A decode step (one new token per sequence) of n sequences runs as the graph of the smallest bucket >= n, over the
persistent input tensors (InputBuffers) padded to the bucket: padding rows write no KV (slot -1), attend over one
key of block 0 and their logits are dropped. Larger batches and any step with a prefill chunk run eagerly.

Graphs are captured largest bucket first, so the smaller ones reuse the memory pool of the larger.
Without capture (CPU, tests) the same padded buffers are run eagerly, so the bucketing and padding logic is
exercised without a GPU.
"""
from __future__ import annotations

import logging
import bisect
import time
from typing import Callable

import torch

_LOG = logging.getLogger("tandem.engine.cuda_graphs")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, the multiples of 8 below max_num_seqs, and max_num_seqs itself."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs, 8))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, run: Callable[[int], torch.Tensor], sizes: list[int], capture: bool) -> None:
        """run(b) computes the logits of the first b rows of the static inputs; captured as each bucket's graph."""
        self.sizes = sorted(sizes)
        self._run = run
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    def bucket(self, n: int) -> int | None:
        """The bucket a decode batch of n sequences runs in, or None when it is too large (eager)."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def run(self, bucket: int) -> torch.Tensor:
        """Logits [bucket, vocab] of the padded batch (a view of the graph's static output when captured)."""
        graph = self._graphs.get(bucket)
        if graph is None:
            return self._run(bucket)
        graph[0].replay()
        return graph[1]

    def _capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for b in reversed(self.sizes):
            self._run(b)                      # compiles the kernels and warms the allocator outside the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._run(b)
            pool = graph.pool()
            self._graphs[b] = (graph, out)
        torch.cuda.synchronize()
        _LOG.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s", len(self.sizes), self.sizes[0],
                  self.max_size, time.perf_counter() - start)
