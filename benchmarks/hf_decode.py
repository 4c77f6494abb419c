"""The reference point for benchmarks.engine_decode: transformers' `generate` on the same model, same shapes.

    python -m benchmarks.hf_decode --gguf ~/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --batch-sizes 1 16 --prompt-len 32 --output-len 32
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(args.gguf.parent), gguf_file=args.gguf.name,
                                                 dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    print(f"{'batch':>6} {'seconds':>9} {'output tok/s':>13}")
    with torch.no_grad():
        model.generate(torch.randint(100, 40000, (1, 8)), max_new_tokens=4, do_sample=False)  # warm-up
        for b in args.batch_sizes:
            ids = torch.randint(100, 40000, (b, args.prompt_len), generator=gen)
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
            dt = time.perf_counter() - t0
            print(f"{b:>6} {dt:>9.2f} {b * args.output_len / dt:>13.1f}")


if __name__ == "__main__":
    main()
