"""Scheduler scenarios, engine only (no gRPC): prefix caching and chunked prefill. Prints tables, writes JSON.

    python -m benchmarks.scheduling --model ~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf
    tandem bench scheduling --model … --scenarios prefix-cache

- prefix-cache: a shared system prompt (1,000 tokens) with N different user suffixes. TTFT with caching on vs off,
  for requests that arrive one after another (sequential) and all at once (burst).
- chunked-prefill: 8 streams decoding while a 4,000-token prompt arrives. Inter-token latency of the 8 streams
  (p50/p99/max) and the long prompt's TTFT, with chunked prefill vs a whole-prompt step.
- host-kv-tier: --tier-prefixes shared prefixes (--tier-prefix-len tokens each) asked in turn, one request at a
  time, for --tier-rounds rounds, on a device KV pool sized to a quarter of their blocks: LRU has evicted a prefix
  from the device by the time it comes back. TTFT and prompt tokens computed with the host KV tier
  (--kv-offload-gb) on and off.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from benchmarks.report import write_json
from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def random_tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


class Clock:
    """Drives an engine step by step and timestamps every request's tokens."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.submitted: dict[str, float] = {}
        self.token_times: dict[str, list[float]] = {}

    def submit(self, rid: str, prompt: list[int], params: SamplingParams) -> None:
        self.engine.add_request(rid, prompt, params)
        self.submitted[rid] = time.perf_counter()
        self.token_times[rid] = []

    def step(self) -> None:
        outputs = self.engine.step()
        now = time.perf_counter()
        for o in outputs:
            self.token_times[o.request_id].append(now)

    def ttft(self, rid: str) -> float:
        return self.token_times[rid][0] - self.submitted[rid]


# --- prefix caching -------------------------------------------------------------------------------------------------

def prefix_cache_run(engine: Engine, system: list[int], suffixes: list[list[int]], burst: bool) -> dict:
    clock = Clock(engine)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    t0 = time.perf_counter()
    if burst:
        for i, s in enumerate(suffixes):
            clock.submit(f"p{i}", system + s, params)
        while engine.has_work():
            clock.step()
    else:
        for i, s in enumerate(suffixes):
            clock.submit(f"p{i}", system + s, params)
            while engine.has_work():
                clock.step()
    ttfts = [clock.ttft(rid) for rid in clock.submitted]
    stats = engine.kv.prefix_stats
    return {"mode": "burst" if burst else "sequential", "prefix_caching": engine.config.enable_prefix_caching,
            "requests": len(suffixes), "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "ttft_mean_s": sum(ttfts) / len(ttfts), "total_s": time.perf_counter() - t0,
            "hit_rate": stats.hit_rate,
            "prompt_tokens_computed": sum(len(system) + len(s) for s in suffixes) - stats.hits}


def prefix_cache_scenario(base: Engine, args) -> list[dict]:
    rng = random.Random(0)
    vocab = base.model_cfg.vocab_size
    system = random_tokens(rng, args.system_len, vocab)
    suffixes = [random_tokens(rng, rng.randrange(10, 30), vocab) for _ in range(args.num_requests)]
    rows = []
    for burst in (False, True):
        for caching in (False, True):
            engine = base.with_scheduling(enable_prefix_caching=caching, kv_offload_gb=0)
            rows.append(prefix_cache_run(engine, system, suffixes, burst))
            r = rows[-1]
            print(f"  prefix-cache {r['mode']:>10}, caching {'on ' if caching else 'off'}: "
                  f"TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms", file=sys.stderr, flush=True)
    print(f"\nprefix caching: a {args.system_len}-token system prompt + {args.num_requests} user suffixes "
          f"(10-29 tokens), 4 output tokens each, budget {base.config.max_num_batched_tokens} tokens/step")
    print(f"{'arrival':>10} {'caching':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'TTFT mean ms':>13} "
          f"{'total s':>8} {'hit rate':>9} {'computed tok':>13}")
    for r in rows:
        print(f"{r['mode']:>10} {'on' if r['prefix_caching'] else 'off':>8} {r['ttft_p50_s'] * 1e3:>12.0f} "
              f"{r['ttft_p99_s'] * 1e3:>12.0f} {r['ttft_mean_s'] * 1e3:>13.0f} {r['total_s']:>8.1f} "
              f"{r['hit_rate']:>9.1%} {r['prompt_tokens_computed']:>13}")
    return rows


# --- chunked prefill ------------------------------------------------------------------------------------------------

def chunked_run(engine: Engine, streams: list[list[int]], long_prompt: list[int], args) -> dict:
    clock = Clock(engine)
    decode = SamplingParams(temperature=0.0, max_tokens=args.warm_steps + args.measure_steps, ignore_eos=True)
    for i, p in enumerate(streams):
        clock.submit(f"s{i}", p, decode)
    for _ in range(args.warm_steps):
        clock.step()
    clock.submit("long", long_prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    arrival = clock.submitted["long"]
    while engine.has_work():
        clock.step()
    # Inter-token gaps of the decoding streams from the long prompt's arrival on.
    gaps = []
    for i in range(len(streams)):
        times = [t for t in clock.token_times[f"s{i}"]]
        gaps += [b - a for a, b in zip(times, times[1:]) if b > arrival]
    return {"chunked": engine.config.enable_chunked_prefill, "budget": engine.config.max_num_batched_tokens,
            "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99), "itl_max_s": max(gaps),
            "long_ttft_s": clock.ttft("long"), "steps": engine.num_steps}


def chunked_scenario(base: Engine, args) -> list[dict]:
    rng = random.Random(1)
    vocab = base.model_cfg.vocab_size
    streams = [random_tokens(rng, 32, vocab) for _ in range(args.num_streams)]
    long_prompt = random_tokens(rng, args.long_len, vocab)
    settings = [dict(enable_chunked_prefill=False, max_num_batched_tokens=base.config.max_model_len)]
    settings += [dict(enable_chunked_prefill=True, max_num_batched_tokens=b) for b in args.chunk_budgets]
    rows = []
    for kw in settings:
        engine = base.with_scheduling(enable_prefix_caching=False, kv_offload_gb=0, **kw)
        rows.append(chunked_run(engine, streams, long_prompt, args))
        r = rows[-1]
        print(f"  chunked-prefill budget {r['budget']}: ITL p99 {r['itl_p99_s'] * 1e3:.0f} ms",
              file=sys.stderr, flush=True)
    print(f"\nchunked prefill: {args.num_streams} streams decoding while a {args.long_len}-token prompt arrives")
    print(f"{'prefill':>10} {'budget':>7} {'ITL p50 ms':>11} {'ITL p99 ms':>11} {'ITL max ms':>11} "
          f"{'long TTFT ms':>13}")
    for r in rows:
        print(f"{'chunked' if r['chunked'] else 'whole':>10} {r['budget']:>7} {r['itl_p50_s'] * 1e3:>11.0f} "
              f"{r['itl_p99_s'] * 1e3:>11.0f} {r['itl_max_s'] * 1e3:>11.0f} {r['long_ttft_s'] * 1e3:>13.0f}")
    return rows


# --- host KV tier ---------------------------------------------------------------------------------------------------

def host_tier_run(engine: Engine, prompts: list[list[int]]) -> dict:
    clock = Clock(engine)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        clock.submit(f"t{i}", p, params)
        while engine.has_work():
            clock.step()
    ttfts = [clock.ttft(rid) for rid in clock.submitted]
    _, _, host_hits, offloaded, loaded = engine.host_kv_stats()
    return {"host_tier": engine.kv.host is not None, "device_blocks": engine.kv.num_blocks,
            "host_blocks": engine.kv.host.num_slots if engine.kv.host else 0, "requests": len(prompts),
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
            "total_s": time.perf_counter() - t0, "hit_rate": engine.kv.prefix_stats.hit_rate,
            "host_hit_blocks": host_hits, "bytes_offloaded": offloaded, "bytes_loaded": loaded,
            "prompt_tokens_computed": sum(map(len, prompts)) - engine.kv.prefix_stats.hits}


def host_tier_scenario(base: Engine, args) -> list[dict]:
    rng = random.Random(2)
    vocab, bs = base.model_cfg.vocab_size, base.config.block_size
    prefixes = [random_tokens(rng, args.tier_prefix_len, vocab) for _ in range(args.tier_prefixes)]
    prompts = [p + random_tokens(rng, rng.randrange(10, 30), vocab) for _ in range(args.tier_rounds)
               for p in prefixes]
    working_set = args.tier_prefixes * (args.tier_prefix_len // bs)
    device_blocks = max(working_set // 4, -(-(max(map(len, prompts)) + 4) // bs))
    rows = []
    for gb in (0, args.kv_offload_gb):
        engine = base.with_scheduling(enable_prefix_caching=True, num_kv_blocks=device_blocks, kv_offload_gb=gb)
        rows.append(host_tier_run(engine, prompts))
        r = rows[-1]
        print(f"  host-kv-tier {'on ' if gb else 'off'}: TTFT p50 {r['ttft_p50_s'] * 1e3:.0f} ms",
              file=sys.stderr, flush=True)
    print(f"\nhost KV tier: {args.tier_prefixes} prefixes of {args.tier_prefix_len} tokens ({working_set} blocks) "
          f"asked in turn for {args.tier_rounds} rounds, one request at a time, 4 output tokens each; device pool "
          f"{device_blocks} blocks of {bs} tokens")
    print(f"{'host tier':>10} {'host blocks':>12} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'total s':>8} "
          f"{'hit rate':>9} {'host hits':>10} {'MB moved':>9} {'computed tok':>13}")
    for r in rows:
        moved = (r["bytes_offloaded"] + r["bytes_loaded"]) / 1e6
        print(f"{'on' if r['host_tier'] else 'off':>10} {r['host_blocks']:>12} {r['ttft_p50_s'] * 1e3:>12.0f} "
              f"{r['ttft_p99_s'] * 1e3:>12.0f} {r['total_s']:>8.1f} {r['hit_rate']:>9.1%} "
              f"{r['host_hit_blocks']:>10} {moved:>9.1f} {r['prompt_tokens_computed']:>13}")
    return rows


SCENARIOS = {"prefix-cache": prefix_cache_scenario, "chunked-prefill": chunked_scenario,
             "host-kv-tier": host_tier_scenario}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--system-len", type=int, default=1000)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--num-streams", type=int, default=8)
    p.add_argument("--long-len", type=int, default=4000)
    p.add_argument("--chunk-budgets", type=int, nargs="+", default=[512],
                   help="token budgets to run chunked prefill with")
    p.add_argument("--warm-steps", type=int, default=4, help="decode steps before the long prompt arrives")
    p.add_argument("--measure-steps", type=int, default=40, help="decode steps of each stream after that")
    p.add_argument("--tier-prefixes", type=int, default=8, help="host-kv-tier: shared prefixes in the working set")
    p.add_argument("--tier-prefix-len", type=int, default=512, help="host-kv-tier: tokens of each prefix")
    p.add_argument("--tier-rounds", type=int, default=3, help="host-kv-tier: times each prefix is asked")
    p.add_argument("--kv-offload-gb", type=float, default=0.5, help="host-kv-tier: the host tier's size")
    p.add_argument("--json", type=Path, default=Path("bench_out/scheduling.json"))
    args = p.parse_args(argv)
    tier = "host-kv-tier" in args.scenarios
    base = Engine(EngineConfig(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                               max_model_len=args.max_model_len, kv_offload_gb=args.kv_offload_gb if tier else 0))
    base.with_scheduling().generate([[100, 101, 102]], SamplingParams(max_tokens=2))  # warm-up
    print(f"{base.model_name} on {base.runner.device} ({str(base.runner.dtype).split('.')[-1]})", file=sys.stderr)
    results = {name: SCENARIOS[name](base, args) for name in args.scenarios}
    write_json(args.json, results)


if __name__ == "__main__":
    main()
