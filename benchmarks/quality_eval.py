"""`tandem eval`: what each precision / quantization mode costs in quality, through the real engine. Prints a
progress line per mode, then one table; writes JSON.

    tandem eval                                         # default SmolLM2 GGUF; fp32 bf16 int8 int4 on the CPU
    tandem eval --modes bf16 int8 int4 fp8 fp8kv --device cuda
    tandem eval --modes fp32 mag24 wanda24 wanda50 --max-tokens 8192   # pruned checkpoints (tandem prune)
    python -m benchmarks.quality_eval --model PATH --modes fp32 bf16 --max-tokens 2048

- Perplexity over a public-domain text that ships in benchmarks/data (Alice's Adventures in Wonderland, 39k
  tokens under SmolLM2's tokenizer): the text is cut into consecutive windows of --context tokens, each window one
  request whose prompt logprobs score it; perplexity = exp(mean NLL over every predicted token). Delta is relative
  to the reference mode's perplexity.
- Greedy agreement with the reference mode: --num-prompts prompts from benchmarks/data/alice_prompts.jsonl,
  --gen-len greedy tokens each (ignore_eos). "agreement" is the share of generated positions equal to the
  reference's up to each sequence's first divergence; "identical" the share of sequences equal throughout.
- Memory: weight bytes and KV-cache bytes per token from the engine's memory plan.
- tok/s: generated tokens per second of the greedy run (all its prompts batched together, or --greedy-seqs at a
  time; the model's load and the perplexity windows not counted).
- Pruned modes (mag24, wanda24, wanda48, mag50, wanda50) serve the model pruned by `tandem prune`, written once
  under --pruned-dir. Wanda calibrates on the last 2048 tokens of --calib (default: the same Alice text); the eval
  says how many of the tokens it scores the calibration also saw (none with --max-tokens 37000 or less).
The reference (default: bf16 on CUDA, fp32 on the CPU) always runs, first.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

from benchmarks.quality_data import (DEFAULT_PROMPTS, DEFAULT_TEXT, read_prompts, read_text, text_ids,
                                     window_prefix)
from benchmarks.quality_metrics import delta_percent, greedy_agreement, perplexity, split_windows
from benchmarks.quality_modes import MODES, Mode, default_reference, modes_to_run
from benchmarks.report import write_json
from engine_svc.config import ATTENTION_BACKENDS, DEVICES, EngineConfig

GB = 1 << 30   # the engine's memory plan prints GB of 2^30 bytes; the table matches it
CPU_DEFAULT_MODES = ["fp32", "bf16", "int8", "int4"]
CUDA_DEFAULT_MODES = ["bf16", "fp16", "int8", "int4", "fp8", "fp8kv"]
CPU_TOKEN_BUDGET, CUDA_TOKEN_BUDGET = 2048, 8192   # tokens per engine step, as the engine's own defaults


def say(message: str) -> None:
    print(f"[eval] {message}", file=sys.stderr, flush=True)


def windows_in_flight(budget: int, context: int) -> int:
    """Windows to keep in the engine so each step's token budget is filled: a step may end one window's prefill
    and start the next ones."""
    return budget // context + 2


def eval_engine_config(model: str, args: argparse.Namespace, device_type: str, windows: list[list[int]],
                       prompts: list[list[int]]) -> EngineConfig:
    """The engine settings every mode shares. The KV cache is sized for what the eval runs (the windows in
    flight, or all the greedy prompts at once), not from free memory: the same cache in every mode, and no
    gigabytes of it allocated on a CPU for a few windows. No prefix caching: windows never share a prefix, and
    greedy outputs must not depend on what ran before."""
    block = 16

    def blocks(tokens: int) -> int:
        return -(-tokens // block)

    budget = CUDA_TOKEN_BUDGET if device_type == "cuda" else CPU_TOKEN_BUDGET
    longest = max(len(w) for w in windows)
    in_flight = min(len(windows), windows_in_flight(budget, longest))
    scoring = in_flight * blocks(longest + 1)
    greedy = sum(blocks(len(p) + args.gen_len) for p in prompts)
    return EngineConfig(model=model, device=args.device, attention_backend=args.attention_backend,
                        enforce_eager=args.enforce_eager, enable_prefix_caching=False, block_size=block,
                        max_num_batched_tokens=budget, max_num_seqs=max(in_flight, len(prompts)),
                        num_kv_blocks=max(scoring, greedy))


def evaluate_mode(base: EngineConfig, mode: Mode, windows: list[list[int]], prompts: list[list[int]],
                  gen_len: int, args: argparse.Namespace | None = None) -> dict:
    """Loads the model in `mode`, scores the windows and generates greedily. The engine is unreachable once this
    returns or raises; free_memory then gives its memory back."""
    from dataclasses import replace

    from benchmarks.quality_runs import greedy_outputs, precision_problem, window_nll
    from engine_svc.engine import Engine

    config = replace(base, dtype=mode.dtype, quantization=mode.quantization, kv_cache_dtype=mode.kv_cache_dtype)
    if mode.prune:
        from benchmarks.quality_pruned import pruned_checkpoint
        config = replace(config, model=str(pruned_checkpoint(base.model, mode, args.pruned_dir, args.calib,
                                                             args.device)))
    say(f"{mode.name}: loading ({mode.describe()})")
    t0 = time.perf_counter()
    engine = Engine(config)
    problem = precision_problem(engine, mode)
    if problem:
        raise RuntimeError(problem)
    longest = max(len(w) for w in windows)
    if longest >= engine.config.max_model_len:
        raise ValueError(f"--context {longest} must be below the engine's max_model_len {engine.config.max_model_len}")
    tenth = max(1, len(windows) // 10)

    def progress(done: int, total: int) -> None:
        if done % tenth == 0 or done == total:
            say(f"{mode.name}: perplexity windows {done}/{total}")

    in_flight = windows_in_flight(engine.config.max_num_batched_tokens, longest)
    nll, count = window_nll(engine, windows, in_flight, progress)
    say(f"{mode.name}: greedy, {len(prompts)} prompts x {gen_len} tokens")
    t_greedy = time.perf_counter()
    seqs = getattr(args, "greedy_seqs", None)
    greedy_engine = engine if seqs is None else engine.with_scheduling(max_num_seqs=seqs)
    outputs = greedy_outputs(greedy_engine, prompts, gen_len) if prompts else []
    greedy_s = time.perf_counter() - t_greedy
    plan = engine.runner.plan
    return {"mode": mode.name, "dtype": str(engine.runner.dtype).split(".")[-1],
            "quantization": mode.quantization, "kv_cache_dtype": mode.kv_cache_dtype,
            "weights_bytes": plan.weights_bytes, "kv_bytes_per_token": plan.kv_bytes_per_token,
            "nll_sum": nll, "predicted_tokens": count, "perplexity": perplexity(nll, count),
            "tokens_per_second": len(prompts) * gen_len / greedy_s if prompts else None,
            "seconds": time.perf_counter() - t0, "greedy_outputs": outputs}


def free_memory(device_type: str) -> None:
    """Gives the last mode's weights and KV cache back before the next mode loads (on a GPU both may not fit
    twice)."""
    gc.collect()
    if device_type == "cuda":
        import torch
        torch.cuda.empty_cache()


def compare(row: dict, ref: dict) -> None:
    """Adds the row's perplexity delta and greedy agreement against the reference row (in place)."""
    row["perplexity_delta_percent"] = delta_percent(row["perplexity"], ref["perplexity"])
    if ref["greedy_outputs"]:
        agree = greedy_agreement(ref["greedy_outputs"], row["greedy_outputs"])
        row["agreement_percent"] = agree.positions_percent
        row["identical_percent"] = agree.identical_percent


HEADER = (f"{'mode':<7} {'weights GB':>10} {'KV B/token':>10} {'ppl':>9} {'delta %':>8} {'agreement %':>11} "
          f"{'identical %':>11} {'tok/s':>7}")


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['mode']:<7} failed: {row['error']}"

    def pct(key: str) -> str:
        return f"{row[key]:.1f}" if key in row else "-"

    speed = f"{row['tokens_per_second']:.1f}" if row.get("tokens_per_second") else "-"
    return (f"{row['mode']:<7} {row['weights_bytes'] / GB:>10.3f} {row['kv_bytes_per_token']:>10} "
            f"{row['perplexity']:>9.3f} {row['perplexity_delta_percent']:>+8.2f} {pct('agreement_percent'):>11} "
            f"{pct('identical_percent'):>11} {speed:>7}")


def summary(row: dict, reference: str) -> str:
    """One mode's figures in a line, printed as soon as it is done: a long CPU run stopped early keeps them."""
    agree = (f", agreement {row['agreement_percent']:.1f}%, identical {row['identical_percent']:.1f}%"
             if "agreement_percent" in row else "")
    return (f"perplexity {row['perplexity']:.3f} ({row['perplexity_delta_percent']:+.2f}% vs {reference}){agree}, "
            f"weights {row['weights_bytes'] / GB:.3f} GB, KV {row['kv_bytes_per_token']} B/token"
            + (f", {row['tokens_per_second']:.1f} tok/s" if row.get("tokens_per_second") else "")
            + f" ({row['seconds']:.0f} s)")


def print_table(result: dict) -> None:
    print(f"\n{result['model']} on {result['device']}: perplexity over {result['predicted_tokens']} tokens of "
          f"{result['text']} ({result['windows']} windows of <= {result['context']}); greedy agreement with "
          f"{result['reference']} on {result['num_prompts']} prompts x {result['gen_len']} tokens")
    print(HEADER)
    for row in result["rows"]:
        print(format_row(row))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tandem eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="HF directory or .gguf with real weights; 'default' is "
                                                     "SmolLM2-135M-Instruct (fetched on first use)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=None,
                   help=f"default: {' '.join(CPU_DEFAULT_MODES)} on the CPU, {' '.join(CUDA_DEFAULT_MODES)} on CUDA")
    p.add_argument("--reference", choices=[n for n, m in MODES.items() if not m.prune], default=None,
                   help="the unquantized mode deltas and agreement are taken against (default: bf16 on CUDA, fp32 "
                        "on the CPU); it always runs")
    p.add_argument("--context", type=int, default=1024, help="window length in tokens (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the text's first N tokens")
    p.add_argument("--num-prompts", type=int, default=32, help="greedy prompts (default %(default)s, all of them)")
    p.add_argument("--gen-len", type=int, default=64, help="greedy tokens per prompt (default %(default)s)")
    p.add_argument("--greedy-seqs", type=int, default=None,
                   help="sequences the greedy run decodes at once (default: all its prompts); 1 decodes each alone, "
                        "the batch-1 path of a single stream (the CPU default's GEMVs)")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="no decode CUDA graphs")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="plain-text file for perplexity")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help='JSONL of {"prompt": ...} objects')
    p.add_argument("--pruned-dir", type=Path, default=Path("bench_out/pruned"),
                   help="where the pruned modes' checkpoints are written once and reused (default %(default)s)")
    p.add_argument("--calib", type=Path, default=DEFAULT_TEXT, help="the pruned wanda modes' calibration text")
    p.add_argument("--json", type=Path, default=Path("bench_out/quality_eval.json"))
    args = p.parse_args(argv)
    if args.context < 2:
        p.error(f"--context must be at least 2, got {args.context}")
    if args.max_tokens is not None and args.max_tokens < 2:
        p.error(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.greedy_seqs is not None and args.greedy_seqs < 1:
        p.error(f"--greedy-seqs must be at least 1, got {args.greedy_seqs}")
    if args.num_prompts < 0 or args.gen_len < 1:
        p.error("--num-prompts must be >= 0 and --gen-len >= 1")
    for flag, path in (("--text", args.text), ("--prompts", args.prompts), ("--calib", args.calib)):
        if not path.is_file():
            p.error(f"{flag}: no file at {path}")
    return args


def resolve_eval_model(value: str) -> str:
    if value == "default":
        from gateway.cli.model_fetch import fetch_default_model
        return str(fetch_default_model())
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model: no model at {value}")
    if path.suffix == ".json":
        raise ValueError("--model: a bare config has no weights to evaluate; give an HF directory or a .gguf")
    return str(path.absolute())


def run(args: argparse.Namespace) -> dict:
    from engine_svc.worker.device_choice import resolve_device
    from tokenizer_svc.loading import load_tokenizer

    model = resolve_eval_model(args.model)
    device = resolve_device(args.device)
    reference = args.reference or default_reference(device.type)
    asked = args.modes or (CUDA_DEFAULT_MODES if device.type == "cuda" else CPU_DEFAULT_MODES)
    modes = modes_to_run(asked, reference)

    tokenizer = load_tokenizer(model)
    ids = text_ids(tokenizer, read_text(args.text))[:args.max_tokens]
    windows = split_windows(ids, args.context, window_prefix(tokenizer))
    if not windows:
        raise ValueError("the text is too short for one window")
    prompt_texts = read_prompts(args.prompts)
    if args.num_prompts > len(prompt_texts):
        raise ValueError(f"--num-prompts {args.num_prompts}: {args.prompts} holds only {len(prompt_texts)}")
    prompts = [tokenizer.encode_text(t) for t in prompt_texts[:args.num_prompts]]
    say(f"{len(ids)} text tokens in {len(windows)} windows; {len(prompts)} prompts; modes {[m.name for m in modes]}")
    if any(m.prune and m.prune[0] == "wanda" for m in modes):
        from benchmarks.quality_pruned import calibration_overlap
        full = len(text_ids(tokenizer, read_text(args.text)))
        seen = calibration_overlap(full, len(ids), args.text.resolve() == args.calib.resolve())
        say(f"wanda modes: {seen} of the {len(ids)} scored tokens are also in the calibration"
            + (" (pass --max-tokens to score only text it never saw)" if seen else ""))

    base = eval_engine_config(model, args, device.type, windows, prompts)
    rows = []
    for mode in modes:   # the reference first
        try:
            row = evaluate_mode(base, mode, windows, prompts, args.gen_len, args)
            compare(row, rows[0] if rows else row)
            say(f"{mode.name}: {summary(row, reference)}")
        except (ValueError, RuntimeError, NotImplementedError) as err:
            if mode.name == reference:
                raise RuntimeError(f"the reference mode {reference} failed: {err}") from err
            say(f"{mode.name}: failed: {err}")
            row = {"mode": mode.name, "error": str(err)}
        free_memory(device.type)
        rows.append(row)
    result = {"benchmark": "quality_eval", "model": Path(model).name, "model_path": model, "device": str(device),
              "reference": reference, "text": args.text.name, "text_tokens": len(ids), "context": args.context,
              "windows": len(windows), "predicted_tokens": sum(len(w) - 1 for w in windows),
              "num_prompts": len(prompts), "gen_len": args.gen_len, "rows": rows}
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        result = run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print_table(result)
    write_json(args.json, result)
    failed = [r["mode"] for r in result["rows"] if "error" in r]
    if failed:
        sys.exit(f"error: mode(s) {', '.join(failed)} failed (see the table)")
    return result


if __name__ == "__main__":
    main()
