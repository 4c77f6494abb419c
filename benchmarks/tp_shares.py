"""Where a tensor-parallel engine's step time goes, for the benchmarks' tables: the share spent in the model's
collectives (the all-reduces of the row-parallel layers and the embedding, the logits all-gather, the broadcast of
the sampled ids under asynchronous scheduling) and in the per-step plan broadcast, timed on the driver (rank 0,
the engine's process) over the engine.step() calls of a run.

On the CPU (gloo) a collective returns when it is done: host time is its time, including the wait for the slowest
rank. On CUDA a collective is timed with CUDA events on the stream (no synchronisation added); decode steps that
replay CUDA graphs hold their all-reduces inside the graph, out of the host's sight, so the collectives of a run
with graphs are those of its eager steps only (run with --enforce-eager to see them all).
"""
from __future__ import annotations

import time
from contextlib import contextmanager

from engine_svc.distributed.parallel_state import TensorParallel

_COLLECTIVES = ("all_reduce", "all_gather_last_dim", "broadcast_from_driver")


class TimedSend:
    """Wraps the driver's StepChannel.send and adds up its time (packing included)."""

    def __init__(self, channel) -> None:
        self.channel, self.send, self.seconds, self.calls = channel, channel.send, 0.0, 0
        channel.send = self

    def __call__(self, plan) -> None:
        t0 = time.perf_counter()
        self.send(plan)
        self.seconds += time.perf_counter() - t0
        self.calls += 1

    def detach(self) -> None:
        self.channel.send = self.send


class _CollectiveClock:
    """Replaces TensorParallel's collectives (in this process: the driver's) by timed ones."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.seconds = 0.0
        self.calls = 0
        self._events: list = []
        self._originals = {name: getattr(TensorParallel, name) for name in _COLLECTIVES}

    def attach(self) -> None:
        for name, fn in self._originals.items():
            setattr(TensorParallel, name, self._timed(fn))

    def detach(self) -> None:
        for name, fn in self._originals.items():
            setattr(TensorParallel, name, fn)

    def _timed(self, fn):
        def timed(tp, *args, **kwargs):
            self.calls += 1
            if self.cuda:
                import torch
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(tp, *args, **kwargs)
                end.record()
                self._events.append((start, end))
                return out
            t0 = time.perf_counter()
            out = fn(tp, *args, **kwargs)
            self.seconds += time.perf_counter() - t0
            return out
        return timed

    def total_seconds(self) -> float:
        if self._events:
            import torch
            torch.cuda.synchronize()
            self.seconds += sum(s.elapsed_time(e) for s, e in self._events) / 1e3
            self._events.clear()
        return self.seconds


@contextmanager
def measured(engine):
    """Times the engine's steps, collectives and plan broadcasts while the block runs; yields a dict filled in at
    its end (empty for a single process, which has neither)."""
    result: dict = {}
    if engine.config.world_size == 1:
        yield result
        return
    clock = _CollectiveClock(engine.runner.device.type == "cuda")
    send = TimedSend(engine.runner.channel)
    step_seconds = [0.0]
    steps0 = engine.num_steps
    step = engine.step

    def timed_step():
        t0 = time.perf_counter()
        try:
            return step()
        finally:
            step_seconds[0] += time.perf_counter() - t0

    engine.step = timed_step
    clock.attach()
    try:
        yield result
    finally:
        clock.detach()
        send.detach()
        del engine.step
        steps = max(engine.num_steps - steps0, 1)
        step_s = step_seconds[0]
        collective_s = clock.total_seconds()
        result.update(tensor_parallel_size=engine.config.tensor_parallel_size, steps=steps,
                      step_ms=step_s / steps * 1e3, collective_ms_per_step=collective_s / steps * 1e3,
                      collectives_per_step=clock.calls / steps, collective_share=collective_s / step_s if step_s else 0,
                      broadcast_us_per_step=send.seconds / steps * 1e6,
                      broadcast_share=send.seconds / step_s if step_s else 0,
                      cuda_graphs=engine.runner.graphs is not None)


def describe(shares: dict | None) -> str:
    if not shares:
        return "tensor parallelism: off (one process: no collectives, no plan broadcast)"
    graphs = " (decode CUDA graphs: their all-reduces are not timed)" if shares["cuda_graphs"] else ""
    return (f"tensor parallelism T={shares['tensor_parallel_size']} on the driver, over {shares['steps']} steps of "
            f"{shares['step_ms']:.2f} ms: collectives {shares['collective_ms_per_step']:.2f} ms/step "
            f"({shares['collectives_per_step']:.0f} calls, {shares['collective_share']:.1%} of the step){graphs}; "
            f"plan broadcast {shares['broadcast_us_per_step']:.0f} us/step ({shares['broadcast_share']:.1%})")
