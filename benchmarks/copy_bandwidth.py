"""The device's copy bandwidth: one buffer copied into another, bytes read plus bytes written over the time (the
median of --repeats copies). It is the roofline's denominator: a memory-bound decode step cannot stream its weights
faster. Prints one line and writes JSON.

    python -m benchmarks.copy_bandwidth --device cuda --gib 4
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.report import write_json


def measure(device: str, gib: float, repeats: int) -> dict:
    import torch

    n = int(gib * (1 << 30)) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if src.is_cuda else (lambda: None)
    seconds = []
    for _ in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        seconds.append(time.perf_counter() - t0)
    median = statistics.median(seconds[1:])   # the first copy warms up
    moved = 2 * src.numel() * src.element_size()
    return {"benchmark": "copy_bandwidth", "device": str(src.device), "bytes_per_copy": moved,
            "seconds_median": median, "gb_s": moved / median / 1e9}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--gib", type=float, default=4.0, help="size of the copied buffer")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--json", type=Path, default=Path("bench_out/copy_bandwidth.json"))
    args = p.parse_args(argv)
    if args.gib <= 0 or args.repeats < 1:
        p.error("need --gib > 0 and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = measure(args.device, args.gib, args.repeats)
    print(f"copy bandwidth on {result['device']}: {result['gb_s']:.1f} GB/s (read + write, median of {args.repeats} "
          f"copies of {args.gib:g} GiB)")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
