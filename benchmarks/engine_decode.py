"""Offline engine decode throughput (no gRPC): prints a table and writes JSON.

    python -m benchmarks.engine_decode --model ~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --batch-sizes 1 8 16 --prompt-len 32 --output-len 64
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine


def run(engine: Engine, batch: int, prompt_len: int, output_len: int, vocab: int) -> dict:
    rng = random.Random(batch)
    prompts = [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    steps0 = engine.num_steps
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    generated = sum(len(o) for o in outs)
    return {"batch": batch, "prompt_len": prompt_len, "output_len": output_len, "seconds": elapsed,
            "steps": engine.num_steps - steps0, "output_tok_s": generated / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--json", type=Path, default=Path("bench_out/engine_decode.json"))
    args = p.parse_args()
    engine = Engine(EngineConfig(model=args.model, load_format=args.load_format, device=args.device,
                                 dtype=args.dtype, max_num_seqs=max(args.batch_sizes)))
    vocab = engine.model_cfg.vocab_size
    run(engine, 1, 8, 4, vocab)  # warm-up
    rows = []
    for b in args.batch_sizes:
        rows.append(run(engine, b, args.prompt_len, args.output_len, vocab))
        r = rows[-1]
        print(f"  batch {b}: {r['output_tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
    print(f"\n{engine.model_name} on {engine.runner.device} ({str(engine.runner.dtype).split('.')[-1]}), "
          f"prompt {args.prompt_len}, output {args.output_len}, greedy")
    print(f"{'batch':>6} {'steps':>6} {'seconds':>9} {'output tok/s':>13}")
    for r in rows:
        print(f"{r['batch']:>6} {r['steps']:>6} {r['seconds']:>9.2f} {r['output_tok_s']:>13.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
