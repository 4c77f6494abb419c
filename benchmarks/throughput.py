"""Offline throughput: N requests with random input and output lengths, all submitted at once, run to
completion. Prints a table, writes JSON.

    python -m benchmarks.throughput --model ~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --num-requests 64 --input-len 32 128 --output-len 32 128 --mode both
    tandem bench throughput --model llama3-8b --device cuda      # shipped config, random weights, engine only

Lengths are drawn uniformly from the inclusive ranges (seeded).
- engine (default): the Engine in this process, no gRPC; random prompt ids, greedy, ignore_eos, so every
  request produces exactly its drawn output length.
- stack: the same workload through the public API of a whole stack (`tandem serve` started here on free ports,
  or the one at --address), one GenerateStream per request, all at once (greedy, max_tokens = drawn length).
  The API takes text, so prompts are built from whole-word tokens to encode to about the drawn length; it has
  no ignore_eos, so a request may stop early at EOS: output tokens are those actually produced.
- both: engine first, then stack, on identical prompt ids (the stack prompts' encodings); the stack's output
  tok/s over the engine's is the cost of the services.
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

from benchmarks import gpu_gaps, tp_shares
from benchmarks.model_arg import add_engine_args, describe, engine_cli_args, engine_config, resolve_model_args, sync
from benchmarks.report import write_json
from benchmarks.synthetic_tokenizer import SYNTHETIC, needs_synthetic, tokenizer_model
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine

MODES = ("engine", "stack", "both")


def draw_lengths(n: int, input_range: tuple[int, int], output_range: tuple[int, int],
                 seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(*input_range), rng.randint(*output_range)) for _ in range(n)]


def random_prompts(lengths: list[tuple[int, int]], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed + 1)
    lo = min(100, vocab - 1)  # ids below 100 hold most special tokens in common vocabularies
    return [[rng.randrange(lo, vocab) for _ in range(n_in)] for n_in, _ in lengths]


def run_engine(engine: Engine, prompts: list[list[int]], output_lens: list[int], adapter_of=None) -> dict:
    """adapter_of(i): the LoRA adapter of request i (None: the base model)."""
    assert not engine.has_work()
    n = len(prompts)
    produced = [0] * n
    finished = 0
    tenth = max(1, n // 10)
    steps0 = engine.num_steps
    sync(engine)
    timeline = gpu_gaps.attach(engine)
    t0 = time.perf_counter()
    with tp_shares.measured(engine) as shares:
        for i, (prompt, out_len) in enumerate(zip(prompts, output_lens)):
            engine.add_request(f"tp-{i}", prompt,
                               SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True),
                               adapter=adapter_of(i) if adapter_of else None)
        while engine.has_work():
            for o in engine.step():
                i = int(o.request_id[3:])
                produced[i] += len(o.new_token_ids)
                if o.finish_reason is not None:
                    finished += 1
                    if finished % tenth == 0 or finished == n:
                        print(f"  engine: {finished}/{n} requests finished, {time.perf_counter() - t0:.1f}s",
                              file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - t0  # step() copied the last sampled ids to the host: the device is done
    prompt_tok, output_tok = sum(len(p) for p in prompts), sum(produced)
    return {"run": "engine", "finished": finished, "errors": 0, "prompt_tokens": prompt_tok,
            "output_tokens": output_tok, "expected_output_tokens": sum(output_lens), "seconds": elapsed,
            "steps": engine.num_steps - steps0, "output_tok_s": output_tok / elapsed,
            "total_tok_s": (prompt_tok + output_tok) / elapsed, "gpu_gaps": gpu_gaps.summarize(engine, timeline),
            "tensor_parallel": shares}


def engine_phase(args, lengths: list[tuple[int, int]], prompts: list[list[int]] | None) -> tuple[dict, str]:
    """Loads the engine, runs the workload, and lets the engine go (its memory is needed by a stack next)."""
    engine = Engine(engine_config(args, max_waiting=max(1024, args.num_requests)))
    need = max(n_in + n_out for n_in, n_out in lengths)
    if prompts is not None:
        need = max(len(p) + n_out for p, (_, n_out) in zip(prompts, lengths))
    if need > engine.config.max_model_len:
        engine.shutdown()
        sys.exit(f"error: a request needs {need} tokens of context; max_model_len is {engine.config.max_model_len}")
    header = describe(engine)
    print(header, file=sys.stderr, flush=True)
    try:
        engine.generate([[100 + i for i in range(8)]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
        if prompts is None:
            prompts = random_prompts(lengths, engine.model_cfg.vocab_size, args.seed)
        row = run_engine(engine, prompts, [n_out for _, n_out in lengths])
    finally:
        engine.shutdown()   # tensor-parallel workers
    row.update(model=engine.model_name, device=str(engine.runner.device),
               dtype=str(engine.runner.dtype).split(".")[-1])
    device = engine.runner.device
    del engine
    gc.collect()
    if device.type == "cuda":
        import torch
        torch.cuda.empty_cache()
    return row, header


def stack_phase(args, prompts, lengths: list[tuple[int, int]]) -> dict:
    from benchmarks.stack_run import LocalStack, run_stack_workload

    max_tokens = [n_out for _, n_out in lengths]
    if args.address:
        return run_stack_workload(args.address, prompts, max_tokens)
    engine_args = engine_cli_args(args) + ["--max-waiting", str(max(1024, args.num_requests))]
    with LocalStack(args.model, args.device, args.dtype, engine_args, args.stack_log, args.start_timeout,
                    args.tokenizer) as stack:
        return run_stack_workload(stack.address, prompts, max_tokens)


def stack_engine_ratio(by_run: dict[str, dict], num_requests: int) -> tuple[float | None, str | None]:
    """(stack / engine output tok/s, None) when both runs served every request without an error; else (None, why
    not): a ratio over runs that did unequal work (requests refused or failed on one side) compares nothing."""
    if len(by_run) != 2:
        return None, None
    short = [f"{name}: {r['finished']} of {num_requests} finished" + (f", {r['errors']} errors" if r["errors"] else "")
             for name, r in by_run.items() if r["finished"] != num_requests or r["errors"]]
    if short:
        return None, "; ".join(short)
    return by_run["stack"]["output_tok_s"] / by_run["engine"]["output_tok_s"], None


def print_table(header: str, workload: dict, rows: list[dict], ratio: float | None) -> None:
    print(f"\n{header}")
    print(f"throughput: {workload['num_requests']} requests at once, input {workload['input_len'][0]}-"
          f"{workload['input_len'][1]}, output {workload['output_len'][0]}-{workload['output_len'][1]} tokens "
          f"(seed {workload['seed']})")
    print(f"{'run':>7} {'finished':>9} {'prompt tok':>11} {'output tok':>11} {'seconds':>8} {'steps':>6} "
          f"{'output tok/s':>13} {'total tok/s':>12}")
    for r in rows:
        steps = "-" if r["steps"] is None else str(r["steps"])
        print(f"{r['run']:>7} {r['finished']:>9} {r['prompt_tokens']:>11} {r['output_tokens']:>11} "
              f"{r['seconds']:>8.2f} {steps:>6} {r['output_tok_s']:>13.1f} {r['total_tok_s']:>12.1f}")
    for r in rows:
        if r["run"] == "engine":
            print(gpu_gaps.describe(r["gpu_gaps"]))
            print(tp_shares.describe(r.get("tensor_parallel")))
        if r.get("finish_reasons"):
            print(f"stack finish reasons: {r['finish_reasons']}" + (f", {r['errors']} errors" if r["errors"] else ""))
    if ratio is not None:
        print(f"stack / engine output tok/s: {ratio:.3f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, nargs=2, default=[128, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[128, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", choices=MODES, default="engine")
    p.add_argument("--address", default=None, help="stack/both: a running gateway HOST:PORT instead of starting "
                                                   "one (it must serve --model, whose tokenizer builds the prompts)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a started stack to serve")
    p.add_argument("--tokenizer", default=None,
                   help="stack/both: the model whose tokenizer builds the prompts and serves in the stack, 'default' "
                        "(the default model's, fetched on first use), or 'synthetic': one built here for --model's "
                        "vocabulary, with no download (benchmarks/synthetic_tokenizer.py). Default: --model's own; "
                        "synthetic for a model without one (a config .json such as a shipped config, a directory "
                        "without tokenizer.json), whatever the model cache holds")
    p.add_argument("--stack-log", type=Path, default=Path("bench_out/throughput_stack.log"))
    p.add_argument("--json", type=Path, default=Path("bench_out/throughput.json"))
    args = p.parse_args(argv)
    for name in ("input_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            p.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX")
    if args.num_requests < 1:
        p.error("--num-requests must be >= 1")
    resolve_model_args(args)
    if args.mode != "engine" and args.tokenizer is None and needs_synthetic(args.model):
        args.tokenizer = SYNTHETIC   # the same tokenizer on every machine, and no network needed
    if args.tokenizer not in (None, SYNTHETIC):
        from gateway.cli.model_fetch import resolve_model
        args.tokenizer = str(resolve_model(args.tokenizer))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tokenizer_model(args.tokenizer, args.model) as args.tokenizer:
        return run(args)


def run(args: argparse.Namespace) -> dict:
    lengths = draw_lengths(args.num_requests, tuple(args.input_len), tuple(args.output_len), args.seed)
    text_prompts = None
    if args.mode != "engine":
        from benchmarks.stack_run import text_prompts as build_text_prompts
        from tokenizer_svc.loading import load_tokenizer
        try:
            tok = load_tokenizer(args.tokenizer or args.model)
        except Exception as err:  # e.g. a bare config .json: the stack needs a real tokenizer
            sys.exit(f"error: --mode {args.mode} needs the model's tokenizer ({err})")
        text_prompts = build_text_prompts(tok, [n_in for n_in, _ in lengths], args.seed)
    rows, header = [], f"stack at {args.address}" if args.address else "stack (started here)"
    if args.mode in ("engine", "both"):
        ids = [p.token_ids for p in text_prompts] if text_prompts else None
        row, header = engine_phase(args, lengths, ids)
        rows.append(row)
    if args.mode in ("stack", "both"):
        rows.append(stack_phase(args, text_prompts, lengths))
    by_run = {r["run"]: r for r in rows}
    ratio, unequal = stack_engine_ratio(by_run, args.num_requests)
    workload = {"num_requests": args.num_requests, "input_len": args.input_len, "output_len": args.output_len,
                "seed": args.seed, "prompts": "text (tokenized)" if text_prompts else "random ids"}
    print_table(header, workload, rows, ratio)
    if unequal:
        print(f"stack / engine output tok/s: not shown, the runs did unequal work ({unequal})")
    result = {"benchmark": "throughput", "model_path": args.model, "load_format": args.load_format,
              "device": args.device, "dtype": args.dtype, "attention_backend": args.attention_backend,
              "quantization": args.quantization, "enforce_eager": args.enforce_eager, "async_scheduling": args.async_scheduling,
              "mode": args.mode, "workload": workload, "runs": rows, "stack_vs_engine_output_tok_s": ratio,
              "unequal_work": unequal}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
