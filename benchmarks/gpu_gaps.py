"""GPU idle time between engine steps, for the benchmarks' tables (CUDA only; the CPU has no separate device)."""
from __future__ import annotations

import statistics


def attach(engine):
    """Starts recording the engine's step timeline; None on the CPU."""
    if engine.runner.device.type != "cuda":
        return None
    from engine_svc.worker.gpu_timeline import GpuTimeline
    engine.runner.timeline = GpuTimeline()
    return engine.runner.timeline


def summarize(engine, timeline) -> dict | None:
    """Detaches the timeline; the idle gaps between consecutive steps and their share of the run's device time."""
    engine.runner.timeline = None
    if timeline is None:
        return None
    gaps, busy = timeline.gaps_ms(), timeline.busy_ms()
    if not gaps:
        return None
    qs = statistics.quantiles(gaps, n=100) if len(gaps) > 1 else [gaps[0]] * 99
    return {"steps": len(busy), "gap_ms_mean": statistics.fmean(gaps), "gap_ms_p50": qs[49], "gap_ms_p99": qs[98],
            "step_ms_mean": statistics.fmean(busy), "idle_fraction": sum(gaps) / (sum(gaps) + sum(busy))}


def describe(gaps: dict | None) -> str:
    if gaps is None:
        return "GPU idle gap between steps: not measured (no CUDA device)"
    return (f"GPU idle gap between steps: mean {gaps['gap_ms_mean']:.3f} ms, p50 {gaps['gap_ms_p50']:.3f} ms, "
            f"p99 {gaps['gap_ms_p99']:.3f} ms; device busy {gaps['step_ms_mean']:.3f} ms/step; "
            f"idle {100 * gaps['idle_fraction']:.1f}% of {gaps['steps']} steps")
