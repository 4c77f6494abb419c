"""The CPU weight formats torch ships, at batch 1: milliseconds per token for every linear of a decode step
(SmolLM2-135M's shapes: 30 layers of qkv, o, gate_up, down, then lm_head), one row per option and thread count.
Each layer has its own weights, so they stream from memory as in the model (the whole set exceeds the caches);
every option multiplies the same activations. Prints a table and writes JSON.

    python -m benchmarks.cpu_linears                     # threads 1 and 2, every option
    python -m benchmarks.cpu_linears --threads 1 --options fp32 int4-fp16

Options (weights / activations):
- fp32, bf16, fp16: F.linear on weights of that dtype (fp32 is what the engine served before the int4 path);
- int8-<act>: torch.ops.aten._weight_int8pack_mm, int8 per output row;
- int4-<act>: torch.ops.aten._weight_int4pack_mm_for_cpu, group 32 (GGUF Q4 blocks' group), lm_head included;
- gemv-q4/q8-head: the CPU default's float32 GEMV over GGUF blocks (engine_svc.quant.gguf_gemv, compiled by
  inductor): Q4 decoder linears, a Q8_0 lm_head (the default model's file). Compiled for one thread, as the
  engine runs it, so its row is the same at every thread count.
Only float32 activations (fp32, gemv) keep the exact path's greedy outputs on the default model (README: "Single-
stream decode on the CPU").
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from benchmarks.report import write_json

# (out features, in features) of SmolLM2-135M's linears, qkv and gate_up fused as the engine holds them
LAYER_SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LM_HEAD = (49152, 576)
NUM_LAYERS = 30
GROUP = 32
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIONS = ("fp32", "bf16", "fp16", "int8-bf16", "int8-fp16", "int4-fp32", "int4-bf16", "int4-fp16", "gemv-q4/q8-head")

Matmul = Callable[[torch.Tensor], torch.Tensor]


def dense(n: int, k: int, dtype: torch.dtype) -> Matmul:
    w = torch.randn(n, k, dtype=dtype) * 0.02
    return lambda x: F.linear(x, w)


def int8(n: int, k: int, dtype: torch.dtype) -> Matmul:
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n, dtype=dtype) * 1e-3
    return lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scales)


def int4(n: int, k: int, dtype: torch.dtype) -> Matmul:
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 2)
    scales_zeros = (torch.randn(k // GROUP, n, 2) * 1e-3).to(dtype)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros)


def gguf_gemv(n: int, k: int, kind: str) -> Matmul:
    """The compiled fp32 GEMV over GGUF blocks (engine_svc.quant.gguf_gemv); kind q4 or q8. Batch 1 only."""
    from engine_svc.quant.compiled_kernels import compile_kernel
    from engine_svc.quant.gguf_gemv import GEMV_FUNCTIONS, GemvBlocks
    if kind == "q4":
        blocks = GemvBlocks("q4", (torch.randint(0, 256, (n, k // GROUP, GROUP // 2), dtype=torch.uint8),
                                   torch.rand(n, k // GROUP) * 1e-3, torch.rand(n, k // GROUP) * 1e-3))
    else:
        blocks = GemvBlocks("q8", (torch.randint(-127, 128, (n, k // GROUP, GROUP), dtype=torch.int8),
                                   torch.rand(n, k // GROUP) * 1e-3))
    kernel = compile_kernel(GEMV_FUNCTIONS[kind], (torch.zeros(k), *blocks.tensors))
    return lambda x: kernel(x.view(-1), *blocks.tensors)


def build(option: str, layers: int = NUM_LAYERS) -> tuple[torch.dtype, list[Matmul]]:
    """The activation dtype and one matmul per linear of a step (`layers` decoder layers, lm_head), in order."""
    kind, _, act = option.partition("-")
    if kind == "gemv":
        dtype, mms = torch.float32, [gguf_gemv(n, k, "q4") for _ in range(layers) for n, k in LAYER_SHAPES.values()]
        return dtype, [*mms, gguf_gemv(*LM_HEAD, "q8")]
    dtype = _DTYPES[act or kind]
    make = {"int8": int8, "int4": int4}.get(kind, dense)
    mms = [make(n, k, dtype) for _ in range(layers) for n, k in LAYER_SHAPES.values()]
    mms.append(make(*LM_HEAD, dtype))
    return dtype, mms


def time_token(dtype: torch.dtype, mms: list[Matmul], warmup: int, repeats: int) -> list[float]:
    """Milliseconds per token (every matmul once, each on an input of its own width), per repeat."""
    xs = {k: torch.randn(1, k, dtype=dtype) for k in {k for _, k in (*LAYER_SHAPES.values(), LM_HEAD)}}
    layers = (len(mms) - 1) // len(LAYER_SHAPES)
    widths = [k for _ in range(layers) for _, k in LAYER_SHAPES.values()] + [LM_HEAD[1]]
    calls = list(zip(mms, (xs[k] for k in widths)))
    out = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        for mm, x in calls:
            mm(x)
        if i >= warmup:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def weight_mb(option: str, layers: int = NUM_LAYERS) -> float:
    """Bytes each option reads per token (weights, scales, zeros), in MB."""
    kind, _, act = option.partition("-")
    if kind == "gemv":
        return (layers * sum(n * k for n, k in LAYER_SHAPES.values()) * (0.5 + 8 / GROUP)
                + LM_HEAD[0] * LM_HEAD[1] * (1 + 4 / GROUP)) / 1e6
    if kind == "int4":
        per_weight = 0.5 + 2 * _DTYPES[act].itemsize / GROUP
    else:
        per_weight = 1.0 if kind == "int8" else _DTYPES[kind].itemsize
    layer_params = layers * sum(n * k for n, k in LAYER_SHAPES.values())
    return (layer_params * per_weight + LM_HEAD[0] * LM_HEAD[1] * per_weight) / 1e6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_linears", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    p.add_argument("--layers", type=int, default=NUM_LAYERS, help="decoder layers of distinct weights (default: "
                   "SmolLM2's %(default)s; fewer fit in the caches and measure hot-cache speed)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", type=Path, default=Path("bench_out/cpu_linears.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = []
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)   # before build: inductor bakes the thread count into its kernels
            for option in args.options:
                dtype, mms = build(option, args.layers)
                ms = time_token(dtype, mms, args.warmup, args.repeats)
                rows.append({"option": option, "threads": threads, "ms_median": statistics.median(ms),
                             "ms_best": min(ms), "weight_mb": weight_mb(option, args.layers)})
                print(f"  {option} x{threads}: {rows[-1]['ms_median']:.2f} ms", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: (args.options.index(r["option"]), r["threads"]))
    print(f"\nbatch-1 linears of one SmolLM2-135M decode step ({args.layers} layers + lm_head), "
          f"median and best of {args.repeats}")
    print(f"{'option':>20} {'threads':>8} {'MB/token':>9} {'ms/token':>9} {'best':>7} {'GB/s':>6} {'x fp32':>7}")
    base = {r["threads"]: r["ms_median"] for r in rows if r["option"] == "fp32"}
    for r in rows:
        ratio = f"{base[r['threads']] / r['ms_median']:.2f}" if r["threads"] in base else "-"
        print(f"{r['option']:>20} {r['threads']:>8} {r['weight_mb']:>9.1f} {r['ms_median']:>9.2f} "
              f"{r['ms_best']:>7.2f} {r['weight_mb'] / r['ms_median']:>6.1f} {ratio:>7}")
    write_json(args.json, {"rows": rows})
    return rows


if __name__ == "__main__":
    main()
