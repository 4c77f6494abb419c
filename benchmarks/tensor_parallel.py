"""Tensor parallelism against one process: step time of prefill and decode at T=1 and T=2 (or the sizes asked),
and the per-step plan broadcast's share of the step (packing included), timed on the driver.

    python -m benchmarks.tensor_parallel --model smollm2-135m --device cpu --dtype float32 \
        --tensor-parallel-sizes 1 2

Engine settings are the other benchmarks' (benchmarks.model_arg); --tensor-parallel-sizes replaces
--tensor-parallel-size.
"""
from __future__ import annotations

import argparse
import random
import time

from benchmarks.model_arg import add_engine_args, engine_config, resolve_model_args
from benchmarks.tp_shares import TimedSend
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine


def timed_steps(engine: Engine, prompts: list[list[int]], max_tokens: int, timer: TimedSend | None) -> dict:
    """Seconds per step and broadcast µs per step over one generate() call."""
    steps0 = engine.num_steps
    b0, c0 = (timer.seconds, timer.calls) if timer else (0.0, 0)
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    elapsed = time.perf_counter() - t0
    steps = engine.num_steps - steps0
    bcast = (timer.seconds - b0) / max(timer.calls - c0, 1) * 1e6 if timer else 0.0
    return {"step_ms": elapsed / steps * 1e3, "steps": steps, "broadcast_us": bcast}


def measure(args, size: int) -> list[dict]:
    engine = Engine(engine_config(args, tensor_parallel_size=size, max_num_seqs=max(args.batch_sizes),
                                  enable_prefix_caching=False, num_kv_blocks=args.num_kv_blocks or 256))
    timer = TimedSend(engine.runner.channel) if size > 1 else None
    rng = random.Random(0)
    vocab = engine.model_cfg.vocab_size
    prompt = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    try:
        timed_steps(engine, [prompt(8)], 4, timer)   # warm-up
        rows = []
        r = timed_steps(engine, [prompt(args.prefill_len)], 1, timer)
        rows.append({"phase": f"prefill {args.prefill_len}", **r})
        for b in args.batch_sizes:
            # A prompt of 4 tokens, then decode: the one prefill step is amortised over output_len steps.
            r = timed_steps(engine, [prompt(4) for _ in range(b)], args.output_len, timer)
            rows.append({"phase": f"decode batch {b}", **r})
        return [{"tp": size, **row} for row in rows]
    finally:
        engine.shutdown()


def _broadcast_peer(rank: int, world: int, init_method: str, capacity: int, iters: int, out) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    buf = torch.zeros(capacity, dtype=torch.int64)
    for _ in range(10):
        dist.broadcast(buf, src=0)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.broadcast(buf, src=0)
    dist.barrier()
    if rank == 0:
        out.put((time.perf_counter() - t0) / iters * 1e6)
    dist.destroy_process_group()


def broadcast_floor(world: int, capacity: int = 2048, iters: int = 2000) -> float:
    """µs per broadcast of the plan tensor (capacity int64) between processes doing nothing else: the transport's
    share of the per-step broadcast, without packing or waiting for a busy peer."""
    import torch.multiprocessing as mp

    from engine_svc.distributed.process_group import free_init_method
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = free_init_method()
    procs = [ctx.Process(target=_broadcast_peer, args=(r, world, init, capacity, iters, out))
             for r in range(world)]
    for p in procs:
        p.start()
    us = out.get(timeout=300)
    for p in procs:
        p.join()
    return us


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--tensor-parallel-sizes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args()
    resolve_model_args(args)
    rows = [row for size in args.tensor_parallel_sizes for row in measure(args, size)]
    floors = {t: broadcast_floor(t) for t in sorted(set(args.tensor_parallel_sizes)) if t > 1}
    print(f"\n{args.model} ({args.load_format}) on {args.device}, {args.dtype}")
    print(f"{'T':>3} {'phase':>16} {'steps':>6} {'ms/step':>9} {'broadcast us/step':>18} {'share':>7}")
    for r in rows:
        share = r["broadcast_us"] / (r["step_ms"] * 1e3)
        print(f"{r['tp']:>3} {r['phase']:>16} {r['steps']:>6} {r['step_ms']:>9.2f} {r['broadcast_us']:>18.0f} "
              f"{share:>7.1%}")
    for t, us in floors.items():
        print(f"gloo broadcast of the 16 KB plan tensor alone, {t} processes: {us:.0f} us")


if __name__ == "__main__":
    main()
