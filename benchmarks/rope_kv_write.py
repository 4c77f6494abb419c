"""The fused RoPE + KV-cache write (engine_svc.kernels.rope_kv_write, what the Triton backend runs) against the pair
it replaces (the rope kernel, then kv_write) at Llama-3-8B's attention shapes: 32 query heads, 8 KV heads,
head_dim 128, 16-token blocks. Median microseconds per layer call for each decode batch size, with a bf16 cache and
an fp8 one; on the GPU each call is timed inside a CUDA graph of many calls (as the decode runs them), so the
figures are the kernels' time, not the host's launch cost. Prints a table and writes JSON.

    python -m benchmarks.rope_kv_write                   # CUDA: batch 1 and 64
    python -m benchmarks.rope_kv_write --small           # tiny shapes; runs anywhere (interpreted on the CPU)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

LLAMA3_8B = dict(heads=32, kv_heads=8, head_dim=128)
SMALL = dict(heads=4, kv_heads=2, head_dim=16)
BLOCK_SIZE = 16
MAX_POSITIONS = 8192


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rope_kv_write", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke run; the default on the CPU)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="decode tokens per call (default: 1 64)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", type=Path, default=Path("bench_out/rope_kv_write.json"))
    args = p.parse_args(argv)
    if min(args.batch) < 1:
        p.error("--batch values must be >= 1")
    return args


def layer_inputs(tokens: int, shape: dict, cache_dtype, device, dtype):
    """(call arguments) of one layer's step: q, k, v views of one fused projection, positions, slots in a cache."""
    import torch

    from engine_svc.models.layers import RotaryEmbedding
    heads, kv_heads, head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
    gen = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device=device, dtype=dtype)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    rope = RotaryEmbedding(head_dim, MAX_POSITIONS, 500000.0, None, fused=True)
    rope.build(device)
    num_blocks = 2 * (tokens // BLOCK_SIZE + 1)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,), generator=gen).to(device)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen)[:tokens].to(device)
    cache = torch.zeros(2, num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=cache_dtype, device=device)
    scales = torch.ones(2, device=device) if cache_dtype == torch.float8_e4m3fn else None
    return positions, q, k, v, rope.cos, rope.sin, cache, slots, scales


def run(args: argparse.Namespace) -> list[dict]:
    import torch
    import engine_svc.kernels  # noqa: F401  (enables the Triton interpreter without CUDA, before triton loads)
    from benchmarks.quant_matmul import time_us
    from engine_svc.kernels.kv_write import write_kv
    from engine_svc.kernels.rope import apply_rope
    from engine_svc.kernels.rope_kv_write import rope_write_kv

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type == "cpu"
    if device.type == "cpu":
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = SMALL if small else LLAMA3_8B
    rows = []
    for cache_name, cache_dtype in (("model dtype", dtype), ("fp8", torch.float8_e4m3fn)):
        for batch in args.batch:
            positions, q, k, v, cos, sin, cache, slots, scales = layer_inputs(batch, shape, cache_dtype, device, dtype)

            def fused():
                rope_write_kv(positions, q, k, v, cos, sin, cache, slots, kv_scales=scales)

            def pair():
                apply_rope(positions, q, k, cos, sin, inplace=True)
                write_kv(k, v, cache, slots, kv_scales=scales)

            rows.append({"cache": cache_name, "batch": batch, **shape,
                         "fused_us": time_us(fused, device, args.warmup, args.repeats),
                         "pair_us": time_us(pair, device, args.warmup, args.repeats)})
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    print(f"{'cache':<13}{'batch':>6}{'fused us':>11}{'pair us':>11}{'saved us':>11}{'pair/fused':>12}")
    for r in rows:
        print(f"{r['cache']:<13}{r['batch']:>6}{r['fused_us']:>11.2f}{r['pair_us']:>11.2f}"
              f"{r['pair_us'] - r['fused_us']:>11.2f}{r['pair_us'] / r['fused_us']:>11.2f}x")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from benchmarks.quant_matmul import GRAPH_CALLS
    from benchmarks.report import write_json

    rows = run(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter; not a speed)"
    shape = rows[0]
    header = (f"RoPE + KV write per layer call on {device}: {shape['heads']} query / {shape['kv_heads']} KV heads of "
              f"{shape['head_dim']}; median of {args.repeats} after {args.warmup} warm-up"
              f"{f' (CUDA graphs of {GRAPH_CALLS} calls)' if torch.cuda.is_available() else ''}; "
              f"fused: rope_kv_write, pair: rope then kv_write")
    print_table(rows, header)
    result = {"benchmark": "rope_kv_write", "device": device, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
