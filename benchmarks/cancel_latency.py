"""How long after a client cancels does the engine report every KV block free? Runs against a live stack.

    tandem serve &            # or any running stack
    python -m benchmarks.cancel_latency --address localhost:50051 --engine localhost:50053 --trials 10
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import grpc

from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc


async def trial(stub, engine, chunks_before_cancel: int) -> tuple[float, float]:
    """Returns (seconds from cancel to all blocks free, mean seconds per engine step while streaming)."""
    call = stub.GenerateStream(api.GenerateRequest(
        prompt="Once upon a time", params=api.GenerationParams(max_tokens=4000, temperature=0)))
    seen, t_first = 0, None
    async for _ in call:
        seen += 1
        if seen == 1:
            t_first = time.perf_counter()
        if seen == chunks_before_cancel:
            break
    step_s = (time.perf_counter() - t_first) / (seen - 1)
    t0 = time.perf_counter()
    call.cancel()
    while True:
        load = await engine.GetLoad(epb.EngineLoadRequest())
        if load.kv_blocks_used == 0 and load.num_running == 0:
            return time.perf_counter() - t0, step_s
        await asyncio.sleep(0.001)


async def main_async(args) -> None:
    async with grpc.aio.insecure_channel(args.address) as ch, grpc.aio.insecure_channel(args.engine) as ech:
        stub, engine = generation_pb2_grpc.GenerationStub(ch), engine_pb2_grpc.EngineStub(ech)
        results = [await trial(stub, engine, 6) for _ in range(args.trials)]
    free = [r[0] * 1000 for r in results]
    steps = [r[1] * 1000 for r in results]
    print(f"{'trials':>6} {'cancel->free p50 ms':>20} {'max ms':>8} {'step ms (p50)':>14}")
    print(f"{args.trials:>6} {statistics.median(free):>20.1f} {max(free):>8.1f} {statistics.median(steps):>14.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--engine", default="localhost:50053")
    p.add_argument("--trials", type=int, default=10)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
