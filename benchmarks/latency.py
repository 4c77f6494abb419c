"""Single-request latency, engine only (no gRPC): batch-1 decode speed and time to first token. Prints tables,
writes JSON.

    python -m benchmarks.latency --model ~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf --dtype float32 \
        --prompt-len 128 --output-len 64 --ttft-prompt-lens 128 512 2048
    tandem bench latency --model llama3-8b --device cuda        # shipped config, random weights

- decode: one request (prompt --prompt-len, --output-len tokens, greedy, ignore_eos) alone in the engine.
  Decode tok/s counts the tokens after the first over the time after the first, so the prefill is excluded;
  the request's TTFT is reported next to it.
- TTFT: one request per prompt length with max_tokens 1: the time from add_request to the step that returns
  its token (the whole prefill, in several steps when the prompt exceeds the token budget).
- speculative decoding (--speculative-method ngram|draft): the decode run twice, without speculation and with it,
  on the same loaded model, in one table: tok/s, speed-up, acceptance rate, mean accepted length (tokens per
  verify row) and the share of the time spent proposing. --workload quote makes the prompt a quoted passage the
  model is asked to repeat (benchmarks/spec_workload.py): the repetitive case speculation is for.
Every figure is the median over --repeats runs, after --warmup untimed runs of the same shape. Prefix caching
is off and every run draws a new prompt, so each prefill is computed in full.

With --cpu-offload-gb N, some decoder layers stream from host memory every step: the table adds the offloaded
bytes, the measured host-to-device bandwidth and the bus-bound decode rate (bandwidth / offloaded bytes per token),
next to the decode rate measured. On the CPU, where the "bus" is a memcpy, compare with a run without it to see the
machinery's overhead.

    tandem bench latency --model default --device cpu --dtype float32 --workload quote --prompt-len 256 \
        --output-len 128 --ttft-prompt-lens --speculative-method ngram --num-speculative-tokens 4
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from benchmarks import gpu_gaps, tp_shares
from benchmarks.model_arg import add_engine_args, describe, engine_config, resolve_model_args, spec_settings, sync
from benchmarks.report import write_json
from benchmarks.spec_workload import quote_prompt
from engine_svc.core.request import SamplingParams
from engine_svc.core.spec_stats import SpecDecodeStats
from engine_svc.engine import Engine


def random_prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Ids below 100 hold most special tokens in common vocabularies; keep prompts to ordinary ones.
    return [rng.randrange(min(100, vocab - 1), vocab) for _ in range(n)]


def timed_request(engine: Engine, rid: str, prompt: list[int], max_tokens: int) -> list[float]:
    """Runs one request alone to completion; returns the perf_counter time of each of its tokens, measured
    from add_request. step() copies the sampled ids to the host, so a step's end is the device's end too."""
    assert not engine.has_work(), "latency runs need an idle engine"
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    sync(engine)
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, params)
    times: list[float] = []
    while engine.has_work():
        outputs = engine.step()
        now = time.perf_counter()
        for o in outputs:
            times.extend([now - t0] * len(o.new_token_ids))
    if len(times) != max_tokens:
        raise RuntimeError(f"request {rid} produced {len(times)} tokens, expected {max_tokens}")
    return times


def decode_prompt(engine: Engine, rng: random.Random, args, run: int) -> list[int]:
    vocab = engine.model_cfg.vocab_size
    if args.workload == "quote":
        return quote_prompt(args.model, args.prompt_len, run, vocab, args.load_format)
    return random_prompt(rng, args.prompt_len, vocab)


def decode_run(engine: Engine, prompt: list[int], rid: str, output_len: int) -> dict:
    times = timed_request(engine, rid, prompt, output_len)
    decode_s = times[-1] - times[0]
    return {"ttft_s": times[0], "decode_s": decode_s,
            "decode_tok_s": (output_len - 1) / decode_s if decode_s > 0 else float("nan")}


def decode_bench(engines: list[Engine], args) -> list[dict]:
    """The decode runs of each engine (without speculation, then with it: one model, two engines), interleaved:
    repeat i runs the same prompt on every engine in turn, so a load that comes and goes on a shared machine
    falls on all of them alike. GPU gaps and tensor-parallel shares are measured on the first engine."""
    rng = random.Random(args.seed)
    for i in range(args.warmup):
        prompt = decode_prompt(engines[0], rng, args, -1 - i)
        for engine in engines:
            decode_run(engine, prompt, f"decode-warmup-{i}", args.output_len)
    for engine in engines:
        engine.scheduler.spec.stats = SpecDecodeStats()   # the timed runs' own
    runs: list[list[dict]] = [[] for _ in engines]
    timeline = gpu_gaps.attach(engines[0])
    with tp_shares.measured(engines[0]) as shares:   # the prompt's steps too: one in output_len of them
        for i in range(args.repeats):
            prompt = decode_prompt(engines[0], rng, args, i)
            for engine, own in zip(engines, runs):
                own.append(decode_run(engine, prompt, f"decode-{i}", args.output_len) | {"prompt_len": len(prompt)})
            print(f"  decode run {i + 1}/{args.repeats}: "
                  + ", ".join(f"{own[-1]['decode_tok_s']:.1f}" for own in runs) + " tok/s", file=sys.stderr,
                  flush=True)
    results = [decode_summary(engine, own, args) for engine, own in zip(engines, runs)]
    results[0] |= {"gpu_gaps": gpu_gaps.summarize(engines[0], timeline), "tensor_parallel": shares}
    return results


def decode_summary(engine: Engine, runs: list[dict], args) -> dict:
    tok_s = [r["decode_tok_s"] for r in runs]
    med = statistics.median(tok_s)
    sd = engine.spec_stats
    spec = None if engine.scheduler.proposer is None else {
        "method": engine.config.speculative_method, "num_speculative_tokens": engine.config.num_speculative_tokens,
        "acceptance_rate": sd.acceptance_rate, "mean_accepted_length": sd.mean_accepted_length,
        "draft_time_share": sd.draft_time_share, "num_drafts": sd.num_drafts,
        "num_draft_tokens": sd.num_draft_tokens, "num_accepted_tokens": sd.num_accepted_tokens,
        "accepted_per_pos": sd.accepted_per_pos}
    return {"prompt_len": round(statistics.median(r["prompt_len"] for r in runs)), "output_len": args.output_len,
            "workload": args.workload, "repeats": args.repeats, "speculative": spec,
            "decode_tok_s_median": med, "decode_tok_s_min": min(tok_s), "decode_tok_s_max": max(tok_s),
            "ms_per_token_median": 1e3 / med, "ttft_ms_median": statistics.median(r["ttft_s"] for r in runs) * 1e3,
            "runs": runs}


def ttft_bench(engine: Engine, args) -> list[dict]:
    rng = random.Random(args.seed + 1)
    vocab = engine.model_cfg.vocab_size
    rows = []
    for n in args.ttft_prompt_lens:
        for i in range(args.warmup):
            timed_request(engine, f"ttft-{n}-warmup-{i}", random_prompt(rng, n, vocab), 1)
        steps0 = engine.num_steps
        ms = []
        with tp_shares.measured(engine) as shares:
            for i in range(args.repeats):
                ms.append(timed_request(engine, f"ttft-{n}-{i}", random_prompt(rng, n, vocab), 1)[0] * 1e3)
        med = statistics.median(ms)
        rows.append({"prompt_len": n, "repeats": args.repeats, "ttft_ms_median": med, "ttft_ms_min": min(ms),
                     "ttft_ms_max": max(ms), "prefill_tok_s": n / med * 1e3,
                     "steps_per_request": (engine.num_steps - steps0) / args.repeats, "ttft_ms": ms,
                     "tensor_parallel": shares})
        print(f"  TTFT at {n} tokens: {med:.1f} ms", file=sys.stderr, flush=True)
    return rows


def offload_figures(engine: Engine) -> dict | None:
    w = engine.runner.weight_offload
    if w is None:
        return None
    return {"layers": w.num_offloaded, "offloaded_gb": w.offloaded_bytes / (1 << 30),
            "bandwidth_gb_s": w.bandwidth / (1 << 30), "bus_bound_tok_s": 1 / w.bus_seconds_per_step}


def weight_bytes_per_token(engine: Engine) -> int:
    """The weight bytes one batch-1 decode step streams: every weight but an untied input embedding, of which it
    reads one row. Over the device's copy bandwidth (benchmarks/copy_bandwidth.py) it gives the decode roofline."""
    cfg = engine.model_cfg
    embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * engine.runner.dtype.itemsize
    return engine.runner.plan.weights_bytes - embedding


def print_tables(header: str, decode: dict, ttft: list[dict]) -> None:
    print(f"\n{header}")
    print(f"\nbatch-1 decode: prompt {decode['prompt_len']}, output {decode['output_len']} (greedy, ignore_eos), "
          f"median of {decode['repeats']}")
    print(f"{'decode tok/s':>13} {'min':>8} {'max':>8} {'ms/token':>9} {'TTFT ms':>8}")
    print(f"{decode['decode_tok_s_median']:>13.1f} {decode['decode_tok_s_min']:>8.1f} "
          f"{decode['decode_tok_s_max']:>8.1f} {decode['ms_per_token_median']:>9.2f} {decode['ttft_ms_median']:>8.1f}")
    if decode.get("weight_offload"):
        w = decode["weight_offload"]
        print(f"weight offload: {w['layers']} layers, {w['offloaded_gb']:.2f} GB per step over "
              f"{w['bandwidth_gb_s']:.1f} GB/s: bus-bound {w['bus_bound_tok_s']:.1f} tok/s, measured "
              f"{decode['decode_tok_s_median']:.1f} tok/s ({decode['decode_tok_s_median'] / w['bus_bound_tok_s']:.0%}"
              f" of the bound)")
    print(gpu_gaps.describe(decode["gpu_gaps"]))
    print("decode: " + tp_shares.describe(decode["tensor_parallel"]))
    if ttft:
        print(f"\nTTFT (max_tokens 1, prefix caching off), median of {ttft[0]['repeats']}")
        print(f"{'prompt':>7} {'TTFT ms':>9} {'min':>9} {'max':>9} {'prefill tok/s':>14} {'steps':>6}")
        for r in ttft:
            print(f"{r['prompt_len']:>7} {r['ttft_ms_median']:>9.1f} {r['ttft_ms_min']:>9.1f} "
                  f"{r['ttft_ms_max']:>9.1f} {r['prefill_tok_s']:>14.1f} {r['steps_per_request']:>6.0f}")
        for r in ttft:
            if r["tensor_parallel"]:
                print(f"prefill {r['prompt_len']}: " + tp_shares.describe(r["tensor_parallel"]))


def print_spec_table(plain: dict, spec: dict) -> None:
    s = spec["speculative"]
    print(f"\nspeculative decoding: {plain['workload']} workload, prompt ~{plain['prompt_len']}, output "
          f"{plain['output_len']} (greedy, ignore_eos), batch 1, median of {plain['repeats']}")
    print(f"{'method':>8} {'K':>3} {'decode tok/s':>13} {'speed-up':>9} {'acceptance':>11} {'mean acc. len':>14} "
          f"{'draft time':>11}")
    print(f"{'none':>8} {'-':>3} {plain['decode_tok_s_median']:>13.1f} {1.0:>8.2f}x {'-':>11} {'-':>14} {'-':>11}")
    print(f"{s['method']:>8} {s['num_speculative_tokens']:>3} {spec['decode_tok_s_median']:>13.1f} "
          f"{spec['decode_tok_s_median'] / plain['decode_tok_s_median']:>8.2f}x {s['acceptance_rate']:>11.2f} "
          f"{s['mean_accepted_length']:>14.2f} {s['draft_time_share']:>10.1%}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--ttft-prompt-lens", type=int, nargs="*", default=[128, 512, 2048],
                   help="prompt lengths to measure TTFT at (none: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each shape before the timed ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", choices=("random", "quote"), default="random",
                   help="random: random token ids; quote: a quoted passage the model is asked to repeat (the "
                        "repetitive case speculative decoding is for)")
    p.add_argument("--cpu-offload-gb", type=float, default=0.0,
                   help="stream this many GB of decoder layers from host memory each step")
    p.add_argument("--json", type=Path, default=Path("bench_out/latency.json"))
    args = p.parse_args(argv)
    if args.prompt_len < 1 or args.output_len < 2 or args.repeats < 1 or args.warmup < 0:
        p.error("need --prompt-len >= 1, --output-len >= 2 (decode speed is measured after the first token), "
                "--repeats >= 1, --warmup >= 0")
    if any(n < 1 for n in args.ttft_prompt_lens):
        p.error("--ttft-prompt-lens must be >= 1")
    if args.max_num_seqs is None:
        args.max_num_seqs = 1  # one request at a time; also keeps the CPU KV cache to one sequence's length
    resolve_model_args(args)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # One request at a time; no prefix caching, so repeated shapes never skip their prefill. The engine runs
    # without speculation; with --speculative-method a second one over the same model runs with it.
    engine = Engine(engine_config(args, enable_prefix_caching=False, speculative_method=None, draft_model=None,
                                 cpu_offload_gb=args.cpu_offload_gb))
    longest = max([args.prompt_len + args.output_len] + [n + 1 for n in args.ttft_prompt_lens])
    if longest > engine.config.max_model_len:
        engine.shutdown()
        sys.exit(f"error: a run needs {longest} tokens of context; max_model_len is {engine.config.max_model_len}")
    header = describe(engine)
    print(header, file=sys.stderr, flush=True)
    try:
        engines = [engine]
        if args.speculative_method is not None:
            engines.append(engine.with_scheduling(**spec_settings(args)))
        decode, spec = (decode_bench(engines, args) + [None])[:2]
        decode["weight_offload"] = offload_figures(engine)
        ttft = ttft_bench(engine, args)
    finally:
        engine.shutdown()   # tensor-parallel workers
    print_tables(header, decode, ttft)
    if spec is not None:
        print_spec_table(decode, spec)
    result = {"benchmark": "latency", "model": engine.model_name, "model_path": args.model,
              "load_format": args.load_format, "device": str(engine.runner.device),
              "dtype": str(engine.runner.dtype).split(".")[-1], "attention_backend": engine.runner.backend.name,
              "quantization": engine.config.quantization, "cuda_graphs": engine.runner.graphs is not None, "async_scheduling": engine.async_scheduling,
              "max_num_batched_tokens": engine.config.max_num_batched_tokens, "decode": decode, "ttft": ttft,
              "weight_bytes_per_token": weight_bytes_per_token(engine),
              "speculative_decode": spec}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
