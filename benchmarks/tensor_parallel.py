"""Tensor and pipeline parallelism against one process: step time and output tokens/s of prefill and decode for
each layout T x P asked for, and where the driver's time goes: the per-step plan broadcast (packing included), the
model's collectives (all-reduce, all-gather), and, under pipeline parallelism, the wait for the previous stage's
activations (transport, plus whatever of the earlier stages' compute the overlap did not hide).

    python -m benchmarks.tensor_parallel --model smollm2-135m --device cpu --dtype float32 \
        --tensor-parallel-sizes 1 2 --pipeline-parallel-sizes 1 2

Every combination of the sizes runs, in order (T fastest). For P > 1 the same engine also runs with one batch in
flight (each step waits for the whole pipeline), the baseline the P batches in flight are measured against,
alternating with it run by run (each row is the median of --repeats runs, after a warm-up of the same shapes). With
P in flight a batch holds 1/P of the requests, so a decode row of B requests runs steps of B/P rows. tok/s counts
prompt tokens on prefill rows, output tokens on decode rows.
Engine settings are the other benchmarks' (benchmarks.model_arg); the --*-sizes options replace
--tensor-parallel-size and --pipeline-parallel-size. Times are the driver's wall time (on the CPU the collectives
are synchronous; on CUDA they are queued, so their share reads low there).
"""
from __future__ import annotations

import argparse
import random
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.model_arg import add_engine_args, engine_config, resolve_model_args
from engine_svc.core.request import SamplingParams
from engine_svc.distributed.parallel_state import TensorParallel
from engine_svc.distributed.pipeline import PendingActivations
from engine_svc.engine import Engine
from engine_svc.loader import read_model_config

SPANS = ("broadcast", "collectives", "stage_wait")


class Spans:
    """Seconds the driver spends in each span, added up over the calls wrapped by timed()."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(SPANS, 0.0)

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


@contextmanager
def timed(spans: Spans, engine: Engine):
    """Times the driver's plan broadcast (an instance's method), the collectives of every layer (TensorParallel's
    methods, patched on the class in this process only) and the activations' wait; restores them after."""
    patched = []

    def wrap(owner, name: str, span: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spans.seconds[span] += time.perf_counter() - t0

        patched.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, wrapper)

    if engine.runner.channel is not None:
        wrap(engine.runner.channel, "send", "broadcast")
    for name in ("all_reduce", "all_gather_last_dim", "broadcast_from_driver"):
        wrap(TensorParallel, name, "collectives")
    wrap(PendingActivations, "wait", "stage_wait")
    try:
        yield
    finally:
        for owner, name, original in reversed(patched):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def timed_steps(engine: Engine, prompts: list[list[int]], max_tokens: int, spans: Spans, tokens: int) -> dict:
    """Per-step figures over one generate() call: ms/step, tokens/s (`tokens` computed in all) and each span's µs
    per step."""
    steps0, before = engine.num_steps, spans.snapshot()
    t0 = time.perf_counter()
    engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    elapsed = time.perf_counter() - t0
    steps = engine.num_steps - steps0
    row = {"step_ms": elapsed / steps * 1e3, "steps": steps, "tok_s": tokens / elapsed}
    row.update({f"{s}_us": (spans.seconds[s] - before[s]) / steps * 1e6 for s in SPANS})
    return row


def measure(args, tp: int, pp: int) -> list[dict]:
    """One engine at T x P: each phase --repeats times, alternating P batches in flight with one (P > 1), after a
    warm-up of the same shapes; the row of the median ms/step of each (phase, batches in flight)."""
    engine = Engine(engine_config(args, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                  max_num_seqs=max(args.batch_sizes), enable_prefix_caching=False,
                                  num_kv_blocks=args.num_kv_blocks or 256))
    rng = random.Random(0)
    vocab = engine.model_cfg.vocab_size
    prompt = lambda n: [rng.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    n = args.prefill_prompts
    phases = [(f"prefill {n}x{args.prefill_len}", lambda: [prompt(args.prefill_len) for _ in range(n)], 1,
               n * args.prefill_len)]
    # A prompt of 4 tokens, then decode: the one prefill step is amortised over output_len steps.
    phases += [(f"decode batch {b}", lambda b=b: [prompt(4) for _ in range(b)], args.output_len,
                b * args.output_len) for b in args.batch_sizes]
    depths = [pp, 1] if pp > 1 else [1]
    spans = Spans()
    rows = []
    try:
        with timed(spans, engine):
            for depth in depths:   # warm-up: the largest shapes, in each mode
                engine.pipeline_depth = depth
                for _, prompts, max_tokens, tokens in phases:
                    timed_steps(engine, prompts(), min(max_tokens, 4), spans, tokens)
            for name, prompts, max_tokens, tokens in phases:
                runs = {depth: [] for depth in depths}
                for _ in range(args.repeats):
                    for depth in depths:
                        engine.pipeline_depth = depth   # 1: each step waits for the whole pipeline
                        runs[depth].append(timed_steps(engine, prompts(), max_tokens, spans, tokens))
                for depth in depths:
                    median = sorted(runs[depth], key=lambda r: r["step_ms"])[len(runs[depth]) // 2]
                    rows.append({"tp": tp, "pp": pp, "in_flight": depth, "phase": name, **median})
        return rows
    finally:
        engine.shutdown()


def _floor_peer(rank: int, world: int, init_method: str, kind: str, numel: int, iters: int, out) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    dtype = torch.int64 if kind == "broadcast" else torch.float32
    buf = torch.zeros(numel, dtype=dtype)

    def once() -> None:
        if kind == "broadcast":
            dist.broadcast(buf, src=0)
        elif rank == 0:
            dist.send(buf, dst=1)
        else:
            dist.recv(buf, src=0)

    for _ in range(10):
        once()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        once()
    dist.barrier()
    if rank == 0:
        out.put((time.perf_counter() - t0) / iters * 1e6)
    dist.destroy_process_group()


def transport_floor(kind: str, world: int, numel: int, iters: int = 500) -> float:
    """µs per gloo broadcast of the plan tensor (numel int64) among `world` processes, or per send of numel fp32
    (the activations) from one process to another, doing nothing else: the transport's share, without packing or
    waiting for a busy peer."""
    import torch.multiprocessing as mp

    from engine_svc.distributed.process_group import free_init_method
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = free_init_method()
    procs = [ctx.Process(target=_floor_peer, args=(r, world, init, kind, numel, iters, out)) for r in range(world)]
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
    p.add_argument("--pipeline-parallel-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--prefill-prompts", type=int, default=2,
                   help="prompts prefilled together (P batches in flight need at least P: a prompt's chunks are "
                        "in one batch at a time)")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="runs of each phase; the median is shown")
    args = p.parse_args()
    resolve_model_args(args)
    layouts = [(t, q) for q in args.pipeline_parallel_sizes for t in args.tensor_parallel_sizes]
    rows = [row for t, q in layouts for row in measure(args, t, q)]
    worlds = sorted({t * q for t, q in layouts if t * q > 1})
    floors = {w: transport_floor("broadcast", w, 2048) for w in worlds}
    hidden = read_model_config(Path(args.model)).hidden_size
    p2p = {}
    if any(q > 1 for _, q in layouts):
        per_batch = {-(-b // q) for b in args.batch_sizes for _, q in layouts}   # decode rows of one batch
        p2p = {tokens: transport_floor("p2p", 2, 2 * tokens * hidden)
               for tokens in sorted({args.prefill_len, *per_batch})}
    print(f"\n{args.model} ({args.load_format}) on {args.device}, {args.dtype}")
    print(f"{'T':>2} {'P':>2} {'flight':>6} {'phase':>16} {'steps':>6} {'ms/step':>9} {'tok/s':>8} "
          f"{'broadcast us':>13} {'collectives us':>15} {'stage wait us':>14}")
    for r in rows:
        step_us = r["step_ms"] * 1e3
        cells = [f"{r[f'{s}_us']:>7.0f} ({r[f'{s}_us'] / step_us:>4.0%})" for s in SPANS]
        print(f"{r['tp']:>2} {r['pp']:>2} {r['in_flight']:>6} {r['phase']:>16} {r['steps']:>6} "
              f"{r['step_ms']:>9.2f} {r['tok_s']:>8.1f} {cells[0]:>13} {cells[1]:>15} {cells[2]:>14}")
    for w, us in floors.items():
        print(f"gloo broadcast of the 16 KB plan tensor alone, {w} processes: {us:.0f} us")
    for tokens, us in p2p.items():
        print(f"gloo send of {tokens} tokens' activations ({2 * tokens * hidden * 4 / 1024:.0f} KB) alone: "
              f"{us:.0f} us")


if __name__ == "__main__":
    main()
