"""Precision and quantization modes side by side, engine only (no gRPC): weights' memory, KV capacity, batch-1
and batch-N decode speed, one engine per mode in one process. Prints a table, writes JSON.

    tandem bench precision --model llama3-8b --device cuda                      # bf16 int8 int4 fp8 fp8+kv
    tandem bench precision --model default --modes fp32 bf16 int8 int4 --output-len 16 --batch 8

- batch-1: one request (prompt --prompt-len, --output-len tokens, greedy, ignore_eos) alone; decode tok/s counts
  the tokens after the first over the time after the first (median of --repeats).
- batch-N: --batch such requests submitted together; decode tok/s counts every token produced after the step in
  which the last of them got its first token, over the time after that step (the prefills are excluded).
- KV tokens: what the memory plan fits in the same --gpu-memory-utilization budget (fp8 KV should double it).
Speedups are against the first mode listed.
"""
from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

from benchmarks.latency import decode_run, random_prompt
from benchmarks.model_arg import add_engine_args, engine_config, resolve_model_args, sync
from benchmarks.quality_modes import MODES, mode_fields
from benchmarks.report import write_json
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine

GB = 1 << 30


def batch_decode(engine: Engine, rng: random.Random, batch: int, prompt_len: int, output_len: int) -> float:
    vocab = engine.model_cfg.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    started: set[str] = set()
    tokens_after, t_first = 0, None
    sync(engine)
    for i in range(batch):
        engine.add_request(f"batch-{i}", random_prompt(rng, prompt_len, vocab), params)
    while engine.has_work():
        outputs = engine.step()
        if t_first is not None:
            tokens_after += sum(len(o.new_token_ids) for o in outputs)
        else:
            started.update(o.request_id for o in outputs if o.new_token_ids)
            if len(started) == batch:
                t_first = time.perf_counter()
    elapsed = time.perf_counter() - t_first
    return tokens_after / elapsed if elapsed > 0 else float("nan")


def measure_mode(args, name: str) -> dict:
    print(f"[bench] mode {name}: loading", file=sys.stderr, flush=True)
    engine = Engine(engine_config(args, enable_prefix_caching=False, max_num_seqs=max(args.batch, 1),
                                  **mode_fields(name)))
    plan = engine.runner.plan
    rng = random.Random(args.seed)
    vocab = engine.model_cfg.vocab_size
    for i in range(args.warmup):
        decode_run(engine, random_prompt(rng, args.prompt_len, vocab), f"warmup-{i}", args.output_len)
        batch_decode(engine, rng, args.batch, args.prompt_len, args.output_len)
    one = [decode_run(engine, random_prompt(rng, args.prompt_len, vocab), f"one-{i}", args.output_len)["decode_tok_s"]
           for i in range(args.repeats)]
    many = [batch_decode(engine, rng, args.batch, args.prompt_len, args.output_len) for _ in range(args.repeats)]
    row = {"mode": name, **mode_fields(name), "dtype_resolved": str(engine.runner.dtype).split(".")[-1],
           "weights_gb": plan.weights_bytes / GB, "kv_bytes_per_token": plan.kv_bytes_per_token,
           "kv_tokens": plan.max_tokens, "batch1_tok_s": statistics.median(one),
           f"batch{args.batch}_tok_s": statistics.median(many), "batch1_runs": one, "batchN_runs": many}
    print(f"[bench] mode {name}: batch-1 {row['batch1_tok_s']:.1f} tok/s, batch-{args.batch} "
          f"{row[f'batch{args.batch}_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    del engine
    gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
    return row


def print_table(rows: list[dict], batch: int, header: str) -> None:
    base = rows[0]
    print(f"\n{header}")
    print(f"{'mode':>8} {'weights GB':>11} {'KV B/tok':>9} {'KV tokens':>10} {'x':>5} {'batch-1 tok/s':>14} {'x':>5} "
          f"{f'batch-{batch} tok/s':>15} {'x':>5}")
    for r in rows:
        n = r[f"batch{batch}_tok_s"]
        print(f"{r['mode']:>8} {r['weights_gb']:>11.2f} {r['kv_bytes_per_token']:>9} {r['kv_tokens']:>10} "
              f"{r['kv_tokens'] / base['kv_tokens']:>5.2f} {r['batch1_tok_s']:>14.1f} "
              f"{r['batch1_tok_s'] / base['batch1_tok_s']:>5.2f} {n:>15.1f} "
              f"{n / base[f'batch{batch}_tok_s']:>5.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--modes", nargs="+", default=["bf16", "int8", "int4", "fp8", "fp8+kv"], choices=[n for n, m in MODES.items() if not m.prune])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=64, help="requests decoded together in the batch-N column")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("bench_out/precision.json"))
    args = p.parse_args(argv)
    if args.output_len < 2 or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("need --output-len >= 2, --batch >= 1, --repeats >= 1, --warmup >= 0")
    resolve_model_args(args)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rows = [measure_mode(args, m) for m in args.modes]
    header = (f"{Path(args.model).stem} ({args.load_format}) on {args.device}: prompt {args.prompt_len}, output "
              f"{args.output_len}, greedy, median of {args.repeats}")
    print_table(rows, args.batch, header)
    result = {"benchmark": "precision", "model_path": args.model, "load_format": args.load_format,
              "batch": args.batch, "prompt_len": args.prompt_len, "output_len": args.output_len, "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
