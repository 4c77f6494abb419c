"""Offline throughput with LoRA adapters: the throughput benchmark's workload (benchmarks.throughput: random prompt
ids, greedy, ignore_eos) once per adapter count, requests assigned to the adapters round-robin; 0 adapters is the
engine without LoRA. Random PEFT adapters (all seven projections, the given rank) are written to a temporary
directory and loaded through the engine's LoRAManager. Prints a table (adapters | output tok/s | cost vs base),
writes JSON.

    python -m benchmarks.lora_throughput --model llama3-8b --device cuda --num-loras 0 8 --lora-rank 16
    python -m benchmarks.lora_throughput --model smollm2-135m --device cpu --num-requests 8 \
        --input-len 16 32 --output-len 8 16 --num-loras 0 2 --lora-rank 8
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.model_arg import add_engine_args, describe, engine_config, resolve_model_args
from benchmarks.report import write_json
from benchmarks.throughput import draw_lengths, random_prompts, run_engine
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from engine_svc.lora.peft_adapter import TARGETS
from engine_svc.model_config import ModelConfig


def write_random_adapter(path: Path, cfg: ModelConfig, rank: int, seed: int) -> Path:
    """A PEFT LoRA directory for cfg's shapes, every decoder projection targeted, bf16 weights."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    h, inter = cfg.hidden_size, cfg.intermediate_size
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    tensors = {}
    for layer in range(cfg.num_layers):
        for name, (fan_in, fan_out) in shapes.items():
            block = "self_attn" if TARGETS[name][0] in ("qkv_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=g) * 0.01).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=g) * 0.01).bfloat16()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(TARGETS), "bias": "none"}))
    return path


def run_with_adapters(args, num_loras: int, lengths, adapter_root: Path) -> tuple[dict, str]:
    lora = dict(enable_lora=True, max_loras=num_loras, max_lora_rank=args.lora_rank,
                max_cpu_loras=num_loras) if num_loras else {}
    engine = Engine(engine_config(args, max_waiting=max(1024, args.num_requests), **lora))
    header = describe(engine)
    print(f"{header}, {num_loras} LoRA adapters", file=sys.stderr, flush=True)
    names = [f"lora{i}" for i in range(num_loras)]
    for i, name in enumerate(names):
        engine.runner.lora.load(name, str(write_random_adapter(adapter_root / name, engine.model_cfg,
                                                               args.lora_rank, seed=i)))
    engine.generate([[100 + i for i in range(8)]], SamplingParams(temperature=0.0, max_tokens=4))  # warm-up
    prompts = random_prompts(lengths, engine.model_cfg.vocab_size, args.seed)
    row = run_engine(engine, prompts, [n_out for _, n_out in lengths],
                     (lambda i: names[i % num_loras]) if num_loras else None)
    row.update(num_loras=num_loras, lora_rank=args.lora_rank if num_loras else None)
    device = engine.runner.device
    del engine
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, header


def print_table(header: str, args, rows: list[dict]) -> None:
    print(f"\n{header}")
    print(f"LoRA throughput: {args.num_requests} requests at once, input {args.input_len[0]}-{args.input_len[1]}, "
          f"output {args.output_len[0]}-{args.output_len[1]} tokens (seed {args.seed}), rank {args.lora_rank}, "
          f"requests round-robin over the adapters")
    print(f"{'adapters':>8} {'output tok':>11} {'seconds':>8} {'steps':>6} {'output tok/s':>13} {'cost vs base':>13}")
    for r in rows:
        cost = "-" if r["cost_vs_base_pct"] is None else f"{r['cost_vs_base_pct']:.1f}%"
        print(f"{r['num_loras']:>8} {r['output_tokens']:>11} {r['seconds']:>8.2f} {r['steps']:>6} "
              f"{r['output_tok_s']:>13.1f} {cost:>13}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--num-loras", type=int, nargs="+", default=[0, 8],
                   help="adapter counts to run, one engine each (0: LoRA off, the base)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--input-len", type=int, nargs=2, default=[128, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=[128, 1024], metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("bench_out/lora_throughput.json"))
    args = p.parse_args(argv)
    if any(n < 0 for n in args.num_loras) or args.lora_rank < 1 or args.num_requests < 1:
        p.error("--num-loras must be >= 0, --lora-rank and --num-requests >= 1")
    for name in ("input_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            p.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX")
    resolve_model_args(args)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    lengths = draw_lengths(args.num_requests, tuple(args.input_len), tuple(args.output_len), args.seed)
    rows, header = [], ""
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as root:
        for n in args.num_loras:
            row, header = run_with_adapters(args, n, lengths, Path(root))
            rows.append(row)
    base = next((r["output_tok_s"] for r in rows if r["num_loras"] == 0), None)
    for r in rows:
        r["cost_vs_base_pct"] = None if base is None or r["num_loras"] == 0 else 100 * (1 - r["output_tok_s"] / base)
    print_table(header, args, rows)
    result = {"benchmark": "lora_throughput", "model_path": args.model, "load_format": args.load_format,
              "device": args.device, "dtype": args.dtype, "lora_rank": args.lora_rank,
              "workload": {"num_requests": args.num_requests, "input_len": args.input_len,
                           "output_len": args.output_len, "seed": args.seed}, "runs": rows}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
