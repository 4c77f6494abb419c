"""Speculative decoding's costs on one device: the verify step against the number of proposals K, the draft
model's cost per proposed token, and the acceptance rate each K needs to break even. The weights are random
(acceptance is meaningless with them), so the speed-up is given as a formula of the measured costs.

    python -m benchmarks.spec_verify --device cuda     # Llama-3-8B shapes, a Llama-3.2-1B-shape draft, bf16
    bash benchmarks/gpu/spec_verify.sh                 # the same on a lent GPU, output under $OUT
    python -m benchmarks.spec_verify --device cpu --target tiny.json --draft tiny-draft.json --batch-sizes 1 2 \\
        --max-k 2 --context-len 16                     # the CPU path, at tiny shapes (tests/benchmarks)

Measured for each batch size b, every row with --context-len tokens of context (random ids, the KV left as
allocated: attention costs the same whatever it holds):
- T(K): one step of b verify rows, each its last token and K random proposals, through the runner's execute():
  host inputs, the forward (the CUDA graph of shape (b, K + 1) with --graphs), rejection sampling (point-mass
  proposals, as n-gram's; a draft's adds a gather of its [b, K, vocab] probabilities), ids to the host.
  K = 0 is a plain decode step;
- T0: a decode step in the engine's pipelined loop (the next step launched before the previous one's ids are
  read), the cost per token without speculation: a step that speculates waits for the step in flight instead;
- D: the draft's cost per proposed token, DraftProposer.propose of K tokens for the b rows over K (one draft
  forward and draw per token): eager as served, and over CUDA graphs of its decode steps with --graphs.
Each figure is the median of --iters timed steps after --warmup untimed ones.

With an acceptance rate a (accepted / proposed, the engine's spec_decode acceptance rate), a verify row yields
1 + a K tokens (the mean accepted length) in T(K) + K D, against one token per T0 without speculation:
    speed-up S(K, a) = (1 + a K) T0 / (T(K) + K D)     (D = 0 for n-gram lookup: host microseconds)
    break-even a*(K) = ((T(K) + K D) / T0 - 1) / K     (S = 1; above 1: K never pays)
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.model_arg import CONFIGS_DIR
from benchmarks.report import write_json
from engine_svc.config import ATTENTION_BACKENDS, DTYPES, EngineConfig
from engine_svc.core.request import Request, SamplingParams
from engine_svc.core.scheduler import ScheduledRequest, SchedulerOutput
from engine_svc.worker.graph_layout import GraphShape
from engine_svc.worker.model_runner import ModelRunner

RATES = (0.5, 0.8)   # acceptance rates the table shows the speed-up at


def break_even_rate(verify_ms: float, k: int, draft_ms_per_token: float, decode_ms: float) -> float:
    """a* of the module docstring: the acceptance rate at which K proposals neither gain nor lose."""
    return ((verify_ms + k * draft_ms_per_token) / decode_ms - 1) / k


def speed_up(rate: float, k: int, verify_ms: float, draft_ms_per_token: float, decode_ms: float) -> float:
    """S(K, a) of the module docstring."""
    return (1 + rate * k) * decode_ms / (verify_ms + k * draft_ms_per_token)


def timed_ms(run, warmup: int, iters: int) -> float:
    """Median wall time of run() in ms; run must return only once the device's work is done."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def pipelined_decode_ms(runner: ModelRunner, out: SchedulerOutput, warmup: int, iters: int) -> float:
    """Per step, with one step in flight while the next is launched (the engine's asynchronous scheduling)."""
    step = runner.launch(out)
    for _ in range(warmup):
        step, previous = runner.launch(out), step
        previous.wait()
    t0 = time.perf_counter()
    for _ in range(iters):
        step, previous = runner.launch(out), step
        previous.wait()
    step.wait()
    return (time.perf_counter() - t0) * 1e3 / iters


def verify_rows(requests: list[Request], k: int, rng: random.Random, vocab: int) -> SchedulerOutput:
    """Each request's last token followed by k random proposals (k = 0: a decode row)."""
    return SchedulerOutput([ScheduledRequest(r, 1 + k, r.num_computed_tokens, samples=True,
                                             spec_token_ids=tuple(rng.randrange(vocab) for _ in range(k)))
                            for r in requests])


def make_requests(batch: int, args, blocks_per_row: int, rng: random.Random, vocab: int) -> list[Request]:
    """batch decoding requests with their own blocks (block 0 stays free: graphs' padding rows read it)."""
    requests = []
    for i in range(batch):
        r = Request(f"r{i}", [rng.randrange(vocab) for _ in range(args.context_len)],
                    SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True), arrival=i)
        r.block_ids = list(range(1 + i * blocks_per_row, 1 + (i + 1) * blocks_per_row))
        r.num_computed_tokens = args.context_len - 1   # the last token is computed by the step
        requests.append(r)
    return requests


def build_runner(args) -> ModelRunner:
    """The target with the draft loaded beside it (the runner's start-up path: both in its memory plan)."""
    max_b, width = max(args.batch_sizes), args.max_k + 1
    max_len = args.context_len + width
    blocks_per_row = -(-max_len // args.block_size)
    config = EngineConfig(model=str(args.target), load_format="dummy", device=args.device, dtype=args.dtype,
                          attention_backend=args.attention_backend, block_size=args.block_size,
                          max_num_seqs=max_b, max_num_batched_tokens=max(max_b * width, args.context_len),
                          max_model_len=max_len, num_kv_blocks=1 + max_b * blocks_per_row, enforce_eager=True,
                          enable_prefix_caching=False, speculative_method="draft", draft_model=str(args.draft),
                          num_speculative_tokens=max(1, args.max_k))
    return ModelRunner(config)


def use_graphs(args, runner: ModelRunner) -> bool:
    return args.graphs == "on" or (args.graphs == "auto" and runner.device.type == "cuda")


def measure(args) -> dict:
    runner = build_runner(args)
    draft = runner.draft_proposers[str(args.draft)]
    graphs, capture = use_graphs(args, runner), runner.device.type == "cuda"
    if graphs:
        runner.enable_step_graphs(capture, [GraphShape(b, k + 1) for b in args.batch_sizes
                                            for k in range(args.max_k + 1)])
    vocab = runner.model_cfg.vocab_size
    rng = random.Random(args.seed)
    blocks_per_row = -(-runner.max_model_len // args.block_size)
    rows, w, n = [], args.warmup, args.iters
    requests = {b: make_requests(b, args, blocks_per_row, rng, vocab) for b in args.batch_sizes}
    for b in args.batch_sizes:
        steps = [verify_rows(requests[b], k, rng, vocab) for k in range(args.max_k + 1)]
        row = {"batch": b, "decode_ms": pipelined_decode_ms(runner, steps[0], w, n),
               "verify_ms": [timed_ms(lambda: runner.execute(out), w, n) for out in steps]}
        if args.max_k:
            # The first call computes the draft's K/V of the whole context (the warm-up); later ones one token
            # then K - 1 proposals per row, as in a step of the engine.
            propose = [(r, args.max_k) for r in requests[b]]
            row["draft_ms_per_token"] = timed_ms(lambda: draft.propose(propose), w + 1, n) / args.max_k
        rows.append(row)
        print(f"  batch {b}: decode {row['decode_ms']:.2f} ms, verify " +
              ", ".join(f"{t:.2f}" for t in row["verify_ms"]) + " ms", file=sys.stderr, flush=True)
    if graphs and args.max_k:
        draft.runner.enable_step_graphs(capture, [GraphShape(b, 1) for b in args.batch_sizes])
        for row in rows:
            propose = [(r, args.max_k) for r in requests[row["batch"]]]
            row["draft_graphs_ms_per_token"] = timed_ms(lambda: draft.propose(propose), w, n) / args.max_k
    for row in rows:
        row["k"] = break_even_table(row)
    return {"benchmark": "spec_verify", "target": Path(args.target).stem, "draft": Path(args.draft).stem,
            "device": str(runner.device), "dtype": str(runner.dtype).removeprefix("torch."),
            "attention_backend": runner.backend.name, "graphs": graphs, "context_len": args.context_len,
            "warmup": w, "iters": n, "memory_plan": runner.plan.describe(), "rates": list(RATES), "rows": rows}


def break_even_table(row: dict) -> list[dict]:
    """Per K >= 1: verify over decode, and the break-even rate and speed-ups for n-gram (no proposing cost), the
    draft as served and the draft over graphs (when measured)."""
    out = []
    t0 = row["decode_ms"]
    proposers = {"ngram": 0.0, "draft": row.get("draft_ms_per_token")}
    if "draft_graphs_ms_per_token" in row:
        proposers["draft_graphs"] = row["draft_graphs_ms_per_token"]
    for k, verify_ms in enumerate(row["verify_ms"][1:], start=1):
        entry = {"k": k, "verify_ms": verify_ms, "verify_over_decode": verify_ms / t0}
        for name, d in proposers.items():
            entry[name] = {"break_even_rate": break_even_rate(verify_ms, k, d, t0),
                           "speed_up": [speed_up(a, k, verify_ms, d, t0) for a in RATES]}
        out.append(entry)
    return out


def print_tables(result: dict) -> None:
    print(f"\nspeculative decoding's costs: {result['target']} verifying, {result['draft']} drafting, random "
          f"weights, {result['dtype']} on {result['device']}, {result['attention_backend']} attention, "
          f"{'CUDA graphs' if result['graphs'] and result['device'].startswith('cuda') else 'eager'}"
          f"{' (padded layout)' if result['graphs'] and not result['device'].startswith('cuda') else ''}, "
          f"context {result['context_len']} tokens per row, median of {result['iters']}")
    print(result["memory_plan"])
    print(f"\n{'batch':>5} {'decode ms T0':>13} {'draft ms/token':>15} {'draft graphs':>13}")
    for r in result["rows"]:
        dg = r.get("draft_graphs_ms_per_token")
        print(f"{r['batch']:>5} {r['decode_ms']:>13.3f} {r.get('draft_ms_per_token', float('nan')):>15.3f} "
              f"{'-' if dg is None else f'{dg:.3f}':>13}")
    names = [n for n in ("ngram", "draft", "draft_graphs") if result["rows"] and result["rows"][0]["k"]
             and n in result["rows"][0]["k"][0]]
    rates = "/".join(f"{a:g}" for a in result["rates"])
    head = "".join(f" {'a* ' + n:>16} {'S@' + rates + ' ' + n:>22}" for n in names)
    print(f"\n{'batch':>5} {'K':>3} {'verify ms':>10} {'T(K)/T0':>8}{head}")
    for r in result["rows"]:
        for e in r["k"]:
            cells = "".join(f" {rate_cell(e[n]['break_even_rate']):>16} "
                            f"{'/'.join(f'{s:.2f}' for s in e[n]['speed_up']):>22}" for n in names)
            print(f"{r['batch']:>5} {e['k']:>3} {e['verify_ms']:>10.3f} {e['verify_over_decode']:>8.2f}{cells}")
    print("\nspeed-up S(K, a) = (1 + a K) T0 / (T(K) + K D); break-even a* = ((T(K) + K D) / T0 - 1) / K, where a is "
          "the acceptance rate (accepted / proposed), 1 + a K the mean accepted length, D the draft's ms/token "
          "(0 for n-gram); 'never': K does not pay even if every proposal is accepted; 'any': it pays even if none is")


def rate_cell(rate: float) -> str:
    """A break-even rate as the table shows it: 'any' when even no accepted proposal loses nothing, 'never' when
    not even all of them pay."""
    return "any" if rate <= 0 else "never" if rate > 1 else f"{rate:.3f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=Path, default=CONFIGS_DIR / "llama3-8b.json", help="the verifying model's config")
    p.add_argument("--draft", type=Path, default=CONFIGS_DIR / "llama3.2-1b.json", help="the draft model's config")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS)
    p.add_argument("--graphs", default="auto", choices=["auto", "on", "off"],
                   help="verify and draft steps as CUDA graphs (auto: on CUDA); on the CPU 'on' runs the graphs' "
                        "padded layout eagerly (needs --attention-backend triton)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--max-k", type=int, default=8, help="K from 0 to this")
    p.add_argument("--context-len", type=int, default=512)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("bench_out/spec_verify.json"))
    args = p.parse_args(argv)
    if args.max_k < 0 or args.context_len < 1 or args.iters < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        p.error("need --max-k >= 0, --context-len >= 1, --iters >= 1, --warmup >= 0 and batch sizes >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (the CPU path: --device cpu with tiny configs)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = measure(args)
    print_tables(result)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
