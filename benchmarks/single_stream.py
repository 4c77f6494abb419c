"""One stream's decode speed through `tandem serve` on the CPU, next to llama.cpp's `llama-bench` on the same GGUF.
Prints a table with the ratios and writes JSON.

    python -m benchmarks.single_stream --llama-bench /tmp/llamacpp/build/bin/llama-bench
    python -m benchmarks.single_stream --dtypes float32 auto --rounds 7

- Tandem: one stack per --dtypes entry (`tandem serve --device cpu --dtype D`: float32 is the exact float32 path,
  auto the default), all up at once. Each round sends one request to each stack in turn (greedy, ignore_eos,
  --output-len tokens after a --prompt-len token prompt), so a load that comes and goes on a shared machine falls
  on all of them alike. A request's decode rate counts the tokens after the first over the time from the first
  token's arrival to the last's, at the client: the prefill is excluded, as llama-bench's tg test excludes it.
- llama.cpp: `llama-bench -m MODEL -p 0 -n OUTPUT_LEN -t THREADS -r 1` once per round and --llama-threads
  entry, after the streams (the stacks idle meanwhile): its tg test generates OUTPUT_LEN tokens from an empty
  prompt. A benchmark peer only: build it yourself (see the README) and pass its path.
Figures are the median and the best over the rounds; `uptime`'s load average is printed before and after.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from benchmarks.report import write_json

DEFAULT_DTYPES = ["float32", "auto"]


def decode_tok_s(chunk_times: list[float], chunk_tokens: list[int]) -> float:
    """Tokens after the first message's over the time from that message to the last."""
    span = chunk_times[-1] - chunk_times[0]
    return (sum(chunk_tokens) - chunk_tokens[0]) / span if span > 0 else float("nan")


async def _one_stream(address: str, prompt: str, output_len: int) -> float:
    from benchmarks.serve_clients import GrpcClient
    from benchmarks.serve_stats import RequestRecord
    rec = RequestRecord(prompt_chars=len(prompt), max_tokens=output_len)
    async with GrpcClient(address) as client:
        await client.stream(rec, prompt, ignore_eos=True, request_id="")
    if not rec.ok or rec.output_tokens != output_len:
        raise RuntimeError(f"stream to {address} failed: {rec.error or f'{rec.output_tokens} tokens'}")
    return decode_tok_s(rec.chunk_times, rec.chunk_tokens)


def llama_bench_tok_s(binary: Path, model: str, output_len: int, threads: int) -> float:
    out = subprocess.run([str(binary), "-m", model, "-p", "0", "-n", str(output_len), "-t", str(threads), "-r", "1",
                          "-o", "json"], check=True, capture_output=True, text=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def summarize(rates: list[float]) -> dict:
    return {"median_tok_s": statistics.median(rates), "best_tok_s": max(rates), "runs": rates}


def print_table(result: dict) -> None:
    rows = result["rows"]
    print(f"\nsingle-stream decode on the CPU, {result['model_name']}: prompt {result['prompt_len']} tokens, "
          f"{result['output_len']} generated; median and best of {result['rounds']} rounds "
          f"(load average {result['load_before']} before, {result['load_after']} after)")
    print(f"{'run':<28} {'tok/s median':>12} {'best':>8} {'ms/token':>9}")
    for name, r in rows.items():
        print(f"{name:<28} {r['median_tok_s']:>12.1f} {r['best_tok_s']:>8.1f} {1e3 / r['median_tok_s']:>9.2f}")
    if result["ratios"]:
        print("\nratios of the medians (best in brackets)")
        for name, (med, best) in result["ratios"].items():
            print(f"  {name:<52} {med:>6.2f} ({best:.2f})")


def ratios(rows: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """Every Tandem row against the first (the exact path, by default) and against llama.cpp."""
    out = {}
    names = [n for n in rows if n.startswith("tandem")]
    for name in names[1:]:
        out[f"{name} / {names[0]}"] = (rows[name]["median_tok_s"] / rows[names[0]]["median_tok_s"],
                                       rows[name]["best_tok_s"] / rows[names[0]]["best_tok_s"])
    for peer in (n for n in rows if n.startswith("llama.cpp")):
        for name in names:
            out[f"{name} / {peer}"] = (rows[name]["median_tok_s"] / rows[peer]["median_tok_s"],
                                       rows[name]["best_tok_s"] / rows[peer]["best_tok_s"])
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.single_stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="a .gguf (default: the default model, fetched on first use)")
    p.add_argument("--dtypes", nargs="+", default=DEFAULT_DTYPES, help="one stack per dtype (default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--llama-bench", type=Path, default=None, help="llama.cpp's llama-bench binary (optional)")
    p.add_argument("--llama-threads", type=int, nargs="+", default=[2], help="one llama.cpp row per thread count")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--log-dir", type=Path, default=Path("bench_out/single_stream"))
    p.add_argument("--json", type=Path, default=Path("bench_out/single_stream.json"))
    args = p.parse_args(argv)
    if args.rounds < 1 or args.output_len < 2 or args.prompt_len < 1:
        p.error("need --rounds >= 1, --output-len >= 2 and --prompt-len >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.stack_run import LocalStack, text_prompts
    from gateway.cli.model_fetch import resolve_model
    from tokenizer_svc.loading import load_tokenizer

    args = parse_args(argv)
    model = str(resolve_model(args.model))
    prompts = text_prompts(load_tokenizer(model), [args.prompt_len] * (args.rounds + 1), seed=0)
    rates: dict[str, list[float]] = {f"tandem serve --dtype {d}": [] for d in args.dtypes}
    peers = [f"llama.cpp -t {t}" for t in args.llama_threads] if args.llama_bench else []
    rates.update({peer: [] for peer in peers})
    load_before = load_average()
    with ExitStack() as stacks:
        addresses = [stacks.enter_context(LocalStack(model, "cpu", d, [], args.log_dir / f"stack_{d}.log",
                                                     args.start_timeout)).address for d in args.dtypes]
        for address in addresses:   # warm-up: first requests pay for lazy start-up work
            asyncio.run(_one_stream(address, prompts[0].text, args.output_len))
        for i in range(1, args.rounds + 1):
            for name, address in zip(rates, addresses):
                rates[name].append(asyncio.run(_one_stream(address, prompts[i].text, args.output_len)))
            for peer, threads in zip(peers, args.llama_threads):
                rates[peer].append(llama_bench_tok_s(args.llama_bench, model, args.output_len, threads))
            print(f"  round {i}/{args.rounds}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()),
                  file=sys.stderr, flush=True)
    rows = {name: summarize(r) for name, r in rates.items()}
    result = {"benchmark": "single_stream", "model": model, "model_name": Path(model).name,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "rounds": args.rounds,
              "load_before": load_before,
              "load_after": load_average(), "rows": rows, "ratios": ratios(rows)}
    print_table(result)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
