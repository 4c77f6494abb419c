"""The quantized linear layers against bf16 F.linear at Llama-3-8B's decoder shapes: per shape and row count M,
median microseconds and effective bandwidth (the bytes every method must read at least: its weight, scales and
offsets, the activations and the output, over the time). At decode sizes the layers are memory-bound, so int8
should approach 2x and int4 4x the bf16 bandwidth-limited speed. Prints a table and writes JSON.

    python -m benchmarks.quant_matmul                    # CUDA: Llama-3-8B shapes, M = 1, 16, 64
    python -m benchmarks.quant_matmul --small            # tiny shapes; runs anywhere (interpreted kernels on CPU)

Methods: bf16 (F.linear), int8 and int4 (group 128; the Triton kernels), int4_shuffled (the same int4 weight with
its GEMV over the layout pre-shuffled at load, engine_svc.kernels.int4_gemv_shuffled; rows above the GEMV's take
the same tiled kernel as int4), fp8 (W8A8 on torch._scaled_mm; only on compute capability >= 8.9, otherwise shown
as n/a). On the CPU the activations are fp32 and fp8 is the emulation. The last columns: bf16 time / int4 time,
and int4 time / int4_shuffled time (> 1: the shuffled layout is faster).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

LLAMA3_8B_SHAPES = {"qkv 4096->6144": (4096, 6144), "o 4096->4096": (4096, 4096),
                    "gate_up 4096->28672": (4096, 28672), "down 14336->4096": (14336, 4096)}
SMALL_SHAPES = {"small 256->384": (256, 384), "small 512->128": (512, 128)}
GROUP_SIZE = 128
METHODS = ("bf16", "int8", "int4", "int4_shuffled", "fp8")
GRAPH_CALLS = 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.quant_matmul", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke run; the default on the CPU)")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64], help="M values (default: 1 16 64)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", type=Path, default=Path("bench_out/quant_matmul.json"))
    return p.parse_args(argv)


def build_layers(k: int, n: int, device, dtype):
    """{method: module} for one shape, quantized from the same random weight."""
    import torch
    from torch import nn

    from engine_svc.quant.fp8_support import fp8_unsupported_reason
    from engine_svc.quant.fp8_linear import Fp8Linear
    from engine_svc.quant.int4_linear import Int4Linear
    from engine_svc.quant.int8_linear import Int8Linear

    dense = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.normal_(0, 0.02)
    layers = {"bf16": dense, "int8": Int8Linear.from_linear(dense, use_triton=True),
              "int4": Int4Linear.from_linear(dense, GROUP_SIZE, use_triton=True),
              "int4_shuffled": Int4Linear.from_linear(dense, GROUP_SIZE, use_triton=True)}
    layers["int4_shuffled"].use_shuffled_gemv()
    fp8_reason = fp8_unsupported_reason(device)
    if fp8_reason is None or device.type == "cpu":
        layers["fp8"] = Fp8Linear.from_linear(dense, emulate=fp8_reason is not None)
    return layers


def layer_bytes(layer, m: int, k: int, n: int, act_bytes: int) -> int:
    """The weight's bytes as stored (the state dict: not the shuffled copy, which holds the same weight again)."""
    tensors = {t.data_ptr(): t for t in layer.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values()) + (m * k + m * n) * act_bytes


def time_us(fn, device, warmup: int, repeats: int) -> float:
    """Median microseconds of fn(). On the GPU, GRAPH_CALLS calls are captured in one CUDA graph and each replay is
    timed with CUDA events, as the engine's decode runs them: timing single eager calls would measure the host's
    launch overhead (tens of microseconds for a Triton launch), not the kernels. perf_counter on the CPU."""
    import torch
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):   # allocations settle outside the capture
            fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                fn()
        graph.replay()
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3 / GRAPH_CALLS)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def run(args: argparse.Namespace) -> list[dict]:
    import torch
    import engine_svc.kernels  # noqa: F401  (enables the Triton interpreter without CUDA, before triton loads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    if device.type == "cpu":   # interpreted kernels: a few calls are plenty to show they run
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    act_bytes = torch.empty((), dtype=dtype).element_size()
    rows = []
    for name, (k, n) in (SMALL_SHAPES if small else LLAMA3_8B_SHAPES).items():
        layers = build_layers(k, n, device, dtype)
        for m in args.rows:
            x = torch.randn(m, k, device=device, dtype=dtype)
            row = {"shape": name, "k": k, "n": n, "m": m}
            with torch.no_grad():
                for method in METHODS:
                    layer = layers.get(method)
                    if layer is None:
                        row[method] = None
                        continue
                    us = time_us(lambda: layer(x), device, args.warmup, args.repeats)
                    row[method] = {"us": us, "gb_s": layer_bytes(layer, m, k, n, act_bytes) / us / 1e3}
            rows.append(row)
        del layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    cells = [f"{m:>19}" for m in METHODS]
    print(f"{'shape':<22}{'M':>5}" + "".join(cells) + f"{'int4 speed-up':>15}{'shuffled/plain':>16}")
    print(f"{'':<22}{'':>5}" + "".join(f"{'us    GB/s':>19}" for _ in METHODS))
    for r in rows:
        line = f"{r['shape']:<22}{r['m']:>5}"
        for method in METHODS:
            c = r[method]
            line += f"{'n/a':>19}" if c is None else f"{c['us']:>11.1f}{c['gb_s']:>8.0f}"
        speedup = r["bf16"]["us"] / r["int4"]["us"]
        shuffled = r["int4"]["us"] / r["int4_shuffled"]["us"]
        print(line + f"{speedup:>14.2f}x{shuffled:>15.2f}x")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from benchmarks.report import write_json

    rows = run(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter; not a speed)"
    header = (f"quantized linear layers on {device}: median of {args.repeats} after {args.warmup} warm-up"
              f"{f' (CUDA graphs of {GRAPH_CALLS} calls)' if torch.cuda.is_available() else ''}; "
              f"GB/s = (weights + scales + x + y bytes) / time; int4 group {GROUP_SIZE}")
    print_table(rows, header)
    result = {"benchmark": "quant_matmul", "device": device, "group_size": GROUP_SIZE, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
