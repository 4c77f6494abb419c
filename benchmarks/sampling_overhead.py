"""What sampling costs next to the decode step it follows: one decode batch (64 sequences by default), timed as the
model forward alone, then greedy sampling, temperature with top-p, and the full sampling set on every row
(temperature, top-k, top-p, min-p, repetition/presence/frequency penalties, logit bias, allowed tokens on a quarter
of the rows, a seed per row, and logprobs with 5 alternatives). Prints a table and writes JSON.

    tandem bench sampling --model llama3-8b --device cuda        # random weights at the real shapes
    python -m benchmarks.sampling_overhead --model default --batch 64
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from benchmarks.model_arg import add_engine_args, describe, engine_config, resolve_model_args, sync
from benchmarks.report import write_json
from engine_svc.core.request import PLACEHOLDER, SamplingParams
from engine_svc.engine import Engine
from engine_svc.worker.model_runner import LaunchedStep


def full_set(i: int, vocab: int) -> SamplingParams:
    rng = random.Random(i)
    allowed = frozenset(rng.sample(range(vocab), 256)) if i % 4 == 0 else None
    return SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                          presence_penalty=0.5, frequency_penalty=0.3, seed=i, max_tokens=1 << 20, ignore_eos=True,
                          logit_bias=tuple((rng.randrange(vocab), 2.0) for _ in range(8)),
                          allowed_token_ids=allowed, logprobs=5)


def decode_batch(engine: Engine, params: list[SamplingParams], prompt_len: int):
    """Prefills one request per params, then schedules (without running) the batch's next decode step."""
    vocab = engine.model_cfg.vocab_size
    rng = random.Random(0)
    for i, p in enumerate(params):
        engine.add_request(f"s{i}", [rng.randrange(100, vocab) for _ in range(prompt_len)], p)
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()
    out = engine.scheduler.schedule()
    assert len(out.scheduled) == len(params) and all(s.num_new_tokens == 1 for s in out.scheduled)
    return out


def sample_step(runner, logits, sampling: list) -> None:
    """The step's sampling, leaving its requests as asynchronous decoding does: the new id pending on the host,
    already counted on the device for penalties (so the next repeat finds them current, as the next step would)."""
    runner.sample_rows(logits, sampling, LaunchedStep(None))
    for s in sampling:
        s.request.token_ids.append(PLACEHOLDER)


def timed(engine: Engine, fn, repeats: int) -> float:
    """Median milliseconds of fn(), synchronised with the device."""
    ms = []
    for _ in range(repeats + 1):
        sync(engine)
        t0 = time.perf_counter()
        fn()
        sync(engine)
        ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms[1:])   # the first run warms up


def parse_batch_args(p: argparse.ArgumentParser, argv: list[str] | None, prompt_len: int, repeats: int,
                     json_path: str) -> argparse.Namespace:
    """The decode-batch benchmarks' arguments: the engine's, then batch, prompt length, repeats and JSON output
    (with p's own); the model resolved, max_num_seqs the batch unless given."""
    add_engine_args(p)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=prompt_len)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--json", type=Path, default=Path(json_path))
    args = p.parse_args(argv)
    if args.max_num_seqs is None:
        args.max_num_seqs = args.batch
    resolve_model_args(args)
    return args


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = parse_batch_args(p, argv, 128, 20, "bench_out/sampling_overhead.json")
    # Eager decode, so that the forward is timed on its own (a CUDA graph covers the same kernels).
    engine = Engine(engine_config(args, enforce_eager=True, async_scheduling=False))
    header = describe(engine)
    print(header, file=sys.stderr, flush=True)
    vocab = engine.model_cfg.vocab_size
    runner = engine.runner
    rows = []
    greedy = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
    nucleus = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=1 << 20, ignore_eos=True)
    for name, params in (("greedy", [greedy] * args.batch), ("temperature + top_p", [nucleus] * args.batch),
                         ("full sampling set", [full_set(i, vocab) for i in range(args.batch)])):
        out = decode_batch(engine.with_scheduling(), params, args.prompt_len)
        sampling = [s for s in out.scheduled if s.samples]
        logits = runner.forward_logits(out)
        forward_ms = timed(engine, lambda: runner.forward_logits(out), args.repeats)
        sample_ms = timed(engine, lambda: sample_step(runner, logits, sampling), args.repeats)
        rows.append({"sampling": name, "batch": args.batch, "forward_ms": forward_ms, "sampling_ms": sample_ms,
                     "sampling_share": sample_ms / (forward_ms + sample_ms)})
        print(f"  {name}: forward {forward_ms:.2f} ms, sampling {sample_ms:.2f} ms", file=sys.stderr, flush=True)
    print(f"\n{header}\ndecode step of {args.batch} sequences at prompt length {args.prompt_len}, median of "
          f"{args.repeats}")
    print(f"{'sampling':>18} {'forward ms':>11} {'sampling ms':>12} {'share of step':>14}")
    for r in rows:
        print(f"{r['sampling']:>18} {r['forward_ms']:>11.2f} {r['sampling_ms']:>12.2f} "
              f"{100 * r['sampling_share']:>13.1f}%")
    result = {"benchmark": "sampling_overhead", "model": engine.model_name, "device": str(runner.device),
              "dtype": str(runner.dtype).split(".")[-1], "rows": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
