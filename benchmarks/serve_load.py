"""Load generator against the public gRPC API, or the OpenAI-compatible HTTP API with --api openai (`tandem bench
serve`): Poisson arrivals at a given rate or a fixed concurrency, prompts from length distributions or a JSONL
file; reports throughput and TTFT, ITL, TPOT and E2E at p50/p90/p99, writes a JSON of everything and PNGs of the
ISL x OSL histogram and the latency CDFs.

    tandem bench serve --address localhost:50051 --num-requests 200 --request-rate 4
    tandem bench serve --model default --num-requests 32 --concurrency 4 --input-len 32 256 --output-len 16 64
    tandem bench serve --address HOST:PORT --dataset prompts.jsonl --concurrency 16
    tandem bench serve --api openai --address localhost:8000 --num-requests 256 --concurrency 64

- Without --address, a `tandem serve` stack is started here on free ports (and stopped at the end).
- --request-rate R: request i is sent at the i-th arrival of a Poisson process of rate R (exponential gaps,
  seeded); inf (default) sends them all at once. --concurrency C caps the requests in flight (both may be set).
- Prompts: --dataset FILE, one JSON object per line with "prompt" (text) and "max_tokens" (or "output_len"); else
  --input-len and --output-len ranges drawn uniformly (seeded), built from whole-word tokens of the model's
  tokenizer so they encode to about the drawn length.
- Requests are greedy with ignore_eos (unless --no-ignore-eos), so each produces its max_tokens.
- --api openai sends the same requests to POST /v1/completions (stream, include_usage, return_token_ids), so
  both APIs can be compared on one stack.
- TTFT: send -> first message with tokens; ITL: gaps between messages, spread over the tokens each carries;
  TPOT: (E2E - TTFT) / (output tokens - 1); E2E: send -> last message.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks.report import write_json
from benchmarks.serve_clients import APIS, client_for
from benchmarks.serve_stats import RequestRecord, format_table, summarize


def read_dataset(path: Path) -> list[tuple[str, int]]:
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            max_tokens = int(obj.get("max_tokens", obj.get("output_len", 0)))
            prompt = obj["prompt"]
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}:{n}: expected {{\"prompt\": str, \"max_tokens\": int}}: {err}") from None
        if not isinstance(prompt, str) or max_tokens < 1:
            raise ValueError(f"{path}:{n}: prompt must be text and max_tokens >= 1")
        items.append((prompt, max_tokens))
    if not items:
        raise ValueError(f"{path} holds no requests")
    return items


def synthetic_workload(args) -> list[tuple[str, int]]:
    from benchmarks.stack_run import text_prompts
    from benchmarks.throughput import draw_lengths
    from tokenizer_svc.loading import load_tokenizer
    lengths = draw_lengths(args.num_requests, tuple(args.input_len), tuple(args.output_len), args.seed)
    tok = load_tokenizer(args.tokenizer or args.model)
    prompts = text_prompts(tok, [n for n, _ in lengths], args.seed)
    return [(p.text, n_out) for p, (_, n_out) in zip(prompts, lengths)]


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Offsets from the start at which each request is sent: a Poisson process of `rate` per second."""
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run_load(address: str, workload: list[tuple[str, int]], rate: float, concurrency: int | None,
                   seed: int, ignore_eos: bool, progress: bool, api_name: str = "grpc"
                   ) -> tuple[list[RequestRecord], float, RequestRecord]:
    """The records, the run's duration, and the warm-up request's record (sent first, outside the summary; a
    server's counters see it too)."""
    records = [RequestRecord(prompt_chars=len(p), max_tokens=m) for p, m in workload]
    offsets = arrival_times(len(workload), rate, seed)
    limit = asyncio.Semaphore(concurrency or len(workload))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(workload), desc="requests", unit="req", file=sys.stderr, dynamic_ncols=True)
    async with client_for(api_name, address) as client:
        warmup = RequestRecord(0, 2)
        await client.stream(warmup, "Hello, warm-up.", True, f"bench-serve-warmup-{seed}")
        start = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            async with limit:
                await client.stream(records[i], workload[i][0], ignore_eos, f"bench-serve-{seed}-{i}")
            if bar is not None:
                bar.update(1)

        await asyncio.gather(*(one(i) for i in range(len(workload))))
        duration = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return records, duration, warmup


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--api", choices=APIS, default="grpc",
                   help="grpc: tandem.v1 GenerateStream; openai: POST /v1/completions with server-sent events "
                        "(the same requests; default %(default)s)")
    p.add_argument("--address", help="a running gateway HOST:PORT (with --api openai: its HTTP port, or a base URL); "
                                     "without it a stack is started here")
    p.add_argument("--model", default="default", help="model of the stack started here, and of the tokenizer that "
                                                      "builds synthetic prompts (default: the default model)")
    p.add_argument("--tokenizer", help="tokenizer for synthetic prompts (default: --model)")
    p.add_argument("--device", default="auto", help="device of the stack started here")
    p.add_argument("--dtype", default="auto", help="dtype of the stack started here")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once")
    p.add_argument("--concurrency", type=int, default=None, help="at most this many requests in flight")
    p.add_argument("--dataset", type=Path, help="JSONL of {\"prompt\": ..., \"max_tokens\": ...}")
    p.add_argument("--input-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"))
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--stack-log", type=Path, default=Path("bench_out/serve_stack.log"))
    p.add_argument("--out-dir", type=Path, default=Path("bench_out/serve"), help="PNGs go here")
    p.add_argument("--json", type=Path, default=Path("bench_out/serve.json"))
    p.add_argument("engine_args", nargs="*", help="after --: engine arguments for the stack started here")
    args = p.parse_args(argv)
    if args.num_requests < 1 or args.request_rate <= 0 or (args.concurrency is not None and args.concurrency < 1):
        p.error("need --num-requests >= 1, --request-rate > 0, --concurrency >= 1")
    if not (1 <= args.input_len[0] <= args.input_len[1] and 1 <= args.output_len[0] <= args.output_len[1]):
        p.error("length ranges need 1 <= MIN <= MAX")
    if args.address is None or args.dataset is None:
        from gateway.cli.model_fetch import resolve_model
        args.model = str(resolve_model(args.model))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    workload = read_dataset(args.dataset) if args.dataset else synthetic_workload(args)
    mode = (f"Poisson {args.request_rate:g} req/s" if args.request_rate != float("inf") else "all at once") + (
        f", concurrency {args.concurrency}" if args.concurrency else "")

    def run(address: str) -> tuple[list[RequestRecord], float, RequestRecord]:
        return asyncio.run(run_load(address, workload, args.request_rate, args.concurrency, args.seed,
                                    args.ignore_eos, args.progress, args.api))

    if args.address:
        address = args.address
        records, duration, warmup = run(address)
    else:
        from benchmarks.stack_run import LocalStack
        with LocalStack(args.model, args.device, args.dtype, args.engine_args, args.stack_log,
                        args.start_timeout, args.tokenizer) as stack:
            address = stack.http_address if args.api == "openai" else stack.address
            records, duration, warmup = run(address)
    summary = summarize(records, duration)
    title = f"tandem bench serve: {len(workload)} requests to {address} over {args.api}, {mode}"
    print("\n" + format_table(summary, title))
    from benchmarks.serve_plots import write_plots
    plots = write_plots(records, args.out_dir, mode)
    print(f"plots: {', '.join(str(p) for p in plots)}", file=sys.stderr)
    result = {"benchmark": "serve", "api": args.api, "address": address, "model": args.model, "mode": mode,
              "request_rate": None if args.request_rate == float("inf") else args.request_rate,
              "concurrency": args.concurrency, "ignore_eos": args.ignore_eos, "summary": summary,
              "plots": [str(p) for p in plots], "requests": [asdict(r) for r in records], "warmup": asdict(warmup)}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
