"""2:4 semi-structured sparse F.linear (torch's cuSPARSELt / CUTLASS kernels) against dense F.linear, at
Llama-3-8B's decoder shapes and M = 1, 16, 64, 256 rows: the same timing the engine's kernel choice makes at load
(engine_svc.pruning.kernel_choice.cuda_timings, median of CUDA-event-timed eager calls), and the choice it would
make per shape. Prints a table and writes JSON. Needs a CUDA GPU of compute capability >= 8.0.

    tandem bench sparse
    python -m benchmarks.sparse_matmul --rows 1 16 64 256 512 --dtype float16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.quant_matmul import LLAMA3_8B_SHAPES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tandem bench sparse", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256], help="M values (default: 1 16 64 256)")
    p.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--json", type=Path, default=Path("bench_out/sparse_matmul.json"))
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    import torch
    from torch import nn

    from engine_svc.pruning.kernel_choice import choose, cuda_timings
    from engine_svc.pruning.scores import pruned
    from engine_svc.pruning.semi_sparse_linear import kernels_unavailable
    from engine_svc.pruning.spec import parse_sparsity

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    reason = kernels_unavailable(device, dtype)
    if reason:
        raise RuntimeError(reason)
    rows, choices = [], {}
    for name, (k, n) in LLAMA3_8B_SHAPES.items():
        linear = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            linear.weight.normal_(0, 0.02)
            linear.weight.copy_(pruned(linear.weight, parse_sparsity("2:4")))
        timings = cuda_timings(linear, tuple(args.rows), args.repeats)
        for m, (dense, sparse) in timings.items():
            rows.append({"shape": name, "k": k, "n": n, "m": m, "dense_us": dense * 1e3, "sparse_us": sparse * 1e3,
                         "speedup": dense / sparse})
        choice = choose((n, k), timings)
        choices[name] = {"sparse": choice.sparse, "speedup": choice.speedup}
        del linear
        torch.cuda.empty_cache()
    return {"benchmark": "sparse_matmul", "device": torch.cuda.get_device_name(), "dtype": args.dtype,
            "rows": rows, "choices": choices}


def print_table(result: dict) -> None:
    print(f"2:4 sparse vs dense F.linear on {result['device']} ({result['dtype']}), median microseconds")
    print(f"{'shape':<22}{'M':>5}{'dense us':>11}{'2:4 us':>11}{'speed-up':>10}")
    for r in result["rows"]:
        print(f"{r['shape']:<22}{r['m']:>5}{r['dense_us']:>11.1f}{r['sparse_us']:>11.1f}{r['speedup']:>9.2f}x")
    print("the engine's choice per shape (geometric mean over these M): " + ", ".join(
        f"{name} {'sparse' if c['sparse'] else 'dense'} (x{c['speedup']:.2f})" for name, c in result["choices"].items()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from benchmarks.report import write_json
    print_table(result)
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
