"""Measures how long the GPU sits idle between engine steps, with CUDA events on the compute stream.

step_begins() is recorded just before a step's first device work is queued and step_ends() just after its last, so
on an idle GPU the begin event fires when the host gets there, and on a busy one right after the previous work:
gap k = end(k-1) -> begin(k) is the time the device waited for the host.
"""
from __future__ import annotations

import torch


class GpuTimeline:
    def __init__(self) -> None:
        self._begins: list[torch.cuda.Event] = []
        self._ends: list[torch.cuda.Event] = []

    def step_begins(self) -> None:
        self._begins.append(self._record())

    def step_ends(self) -> None:
        self._ends.append(self._record())

    @staticmethod
    def _record() -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def gaps_ms(self) -> list[float]:
        """Idle time before each step after the first."""
        torch.cuda.synchronize()
        return [self._ends[i - 1].elapsed_time(self._begins[i]) for i in range(1, len(self._ends))]

    def busy_ms(self) -> list[float]:
        torch.cuda.synchronize()
        return [b.elapsed_time(e) for b, e in zip(self._begins, self._ends)]
