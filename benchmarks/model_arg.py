"""The model and engine arguments shared by the latency and throughput benchmarks.

`--model` takes a path (HF directory, .gguf, config .json), 'default', or the short name of a config shipped in
engine_svc/configs (e.g. `llama3-8b`, `smollm2-135m`). Short names exist only here, for benchmarks: the engine
itself takes paths. A shipped config has no weights, so a short name implies `--load-format dummy`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import engine_svc
from engine_svc.config import (ATTENTION_BACKENDS, DEVICES, DTYPES, INT4_GEMV_LAYOUTS, KV_CACHE_DTYPES,
                               LOAD_FORMATS, QUANTIZATIONS, SPECULATIVE_METHODS, EngineConfig)

SPEC_FIELDS = ("speculative_method", "num_speculative_tokens", "draft_model", "ngram_min", "ngram_max")

CONFIGS_DIR = Path(engine_svc.__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CONFIGS_DIR.glob("*.json"))}


def resolve_model(value: str) -> tuple[str, bool]:
    """Returns (path, is_shipped_config). An existing path wins over a short name of the same spelling;
    'default' is the default model of `tandem serve` (fetched on first use)."""
    if value == "default":
        from gateway.cli.model_fetch import fetch_default_model
        return str(fetch_default_model()), False
    path = Path(value).expanduser()
    if path.exists():
        return str(path.absolute()), False  # absolute, not resolved: a symlink keeps its own name
    configs = shipped_configs()
    if value in configs:
        return str(configs[value]), True
    raise FileNotFoundError(f"no model at {value}; short names of shipped configs: {', '.join(configs)}")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="HF directory, .gguf, config .json, 'default', or a shipped config: "
                        + ", ".join(shipped_configs()))
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS,
                   help="dummy: random weights at the config's shapes (implied by a shipped config name)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto: the model dtype; fp8: e4m3 (twice the tokens of bf16)")
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="auto: triton on CUDA, torch on the CPU")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="weight quantization on load: int8, int4 (group 128, RTN), fp8 (W8A8, Ada/Hopper)")
    p.add_argument("--int4-gemv-layout", default="plain", choices=INT4_GEMV_LAYOUTS,
                   help="the int4 GEMV's weight layout (engine_svc.quant.int4_gemv_layout)")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode")
    p.add_argument("--async-scheduling", dest="async_scheduling", action="store_true", default=None,
                   help="overlap scheduling with the device (engine default: on CUDA only)")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    p.add_argument("--max-num-seqs", type=int, default=None, help="default: the benchmark's own choice")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget per step (engine default: 8192 on CUDA, 2048 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's context")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="default: sized from free memory")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="ranks each pipeline stage is split over")
    p.add_argument("--pipeline-parallel-size", type=int, default=1,
                   help="stages the layers are split into (T x P ranks in all)")
    p.add_argument("--speculative-method", default=None, choices=SPECULATIVE_METHODS,
                   help="speculative decoding: ngram (prompt lookup) or draft (--draft-model)")
    p.add_argument("--num-speculative-tokens", type=int, default=4, help="tokens proposed per step")
    p.add_argument("--draft-model", default=None, help="the draft model (HF directory or .gguf)")
    p.add_argument("--ngram-min", type=int, default=1)
    p.add_argument("--ngram-max", type=int, default=4)


def resolve_model_args(args: argparse.Namespace) -> None:
    """Replaces args.model by a path and sets dummy weights for a shipped config (in place)."""
    args.model, shipped = resolve_model(args.model)
    if shipped and args.load_format != "dummy":
        print(f"[bench] {Path(args.model).name} is a shipped config without weights: using --load-format dummy",
              file=sys.stderr, flush=True)
        args.load_format = "dummy"


def engine_config(args: argparse.Namespace, **overrides) -> EngineConfig:
    """EngineConfig from the shared arguments; `overrides` are the benchmark's own settings (e.g. max_waiting).
    Unset optional arguments keep the engine's defaults."""
    fields = dict(model=args.model, load_format=args.load_format, device=args.device, dtype=args.dtype,
                  attention_backend=args.attention_backend, quantization=args.quantization,
                  int4_gemv_layout=args.int4_gemv_layout, kv_cache_dtype=args.kv_cache_dtype, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=args.max_model_len, num_kv_blocks=args.num_kv_blocks,
                  enforce_eager=args.enforce_eager, async_scheduling=args.async_scheduling,
                  tensor_parallel_size=args.tensor_parallel_size,
                  pipeline_parallel_size=args.pipeline_parallel_size)
    if args.max_num_seqs is not None:
        fields["max_num_seqs"] = args.max_num_seqs
    fields.update(spec_settings(args))
    fields.update(overrides)
    return EngineConfig(**fields)


def spec_settings(args: argparse.Namespace) -> dict:
    """The speculative-decoding fields of EngineConfig from the shared arguments (a draft path made absolute)."""
    settings = {name: getattr(args, name) for name in SPEC_FIELDS}
    if settings["draft_model"] is not None:
        settings["draft_model"] = str(Path(settings["draft_model"]).expanduser().absolute())
    return settings


def engine_cli_args(args: argparse.Namespace) -> list[str]:
    """The same settings as `python -m engine_svc` arguments, for a stack started with `tandem serve -- ...`.
    device and dtype are `tandem serve` options of their own and are not included."""
    out = ["--load-format", args.load_format, "--attention-backend", args.attention_backend,
           "--kv-cache-dtype", args.kv_cache_dtype]
    if args.quantization != "none":
        out += ["--quantization", args.quantization]
    if args.int4_gemv_layout != "plain":
        out += ["--int4-gemv-layout", args.int4_gemv_layout]
    if args.enforce_eager:
        out.append("--enforce-eager")
    if args.async_scheduling is not None:
        out.append("--async-scheduling" if args.async_scheduling else "--no-async-scheduling")
    if args.tensor_parallel_size > 1:
        out += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    if args.pipeline_parallel_size > 1:
        out += ["--pipeline-parallel-size", str(args.pipeline_parallel_size)]
    if args.speculative_method is not None:
        spec = spec_settings(args)
        out += ["--speculative-method", spec["speculative_method"],
                "--num-speculative-tokens", str(spec["num_speculative_tokens"]),
                "--ngram-min", str(spec["ngram_min"]), "--ngram-max", str(spec["ngram_max"])]
        if spec["draft_model"] is not None:
            out += ["--draft-model", spec["draft_model"]]
    for flag, value in (("--max-num-seqs", args.max_num_seqs),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens),
                        ("--max-model-len", args.max_model_len), ("--num-kv-blocks", args.num_kv_blocks)):
        if value is not None:
            out += [flag, str(value)]
    return out


def describe(engine) -> str:
    """One line naming what ran: model, device, dtype, backend, budget."""
    cfg = engine.config
    weights = "" if cfg.quantization == "none" else f", {cfg.quantization} weights"
    return (f"{engine.model_name} ({cfg.load_format}) on {engine.runner.device} "
            f"({str(engine.runner.dtype).split('.')[-1]}{weights}), {engine.runner.backend.name} attention, "
            f"decode {'CUDA graphs' if engine.runner.graphs is not None else 'eager'}, "
            f"{'async' if engine.async_scheduling else 'sync'} scheduling, "
            f"max_num_seqs {cfg.max_num_seqs}, budget {cfg.max_num_batched_tokens} tokens/step, "
            f"max_model_len {cfg.max_model_len}")


def sync(engine) -> None:
    """Waits for queued device work, so a timer started after it measures only what follows."""
    if engine.runner.device.type == "cuda":
        import torch
        torch.cuda.synchronize(engine.runner.device)
