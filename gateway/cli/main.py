"""The `tandem` command: serve, generate, fetch-model, bench, eval, prune.

Parsing is kept apart from running (`parse_args` and the `*_from_args` builders are pure) so it can be tested
without starting anything. Nothing here imports torch: the engine runs as its own process.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from gateway.cli.generate_client import ConnectionOptions, GenerateOptions, run_generate, unescape
from gateway.cli.launcher import LauncherConfig, run_stack
from gateway.cli.model_fetch import DEFAULT_MODEL, resolve_model
from gateway.cli.service_commands import (DEFAULT_ENGINE_PORT, DEFAULT_GATEWAY_PORT, DEFAULT_HTTP_PORT,
                                          DEFAULT_METRICS_PORT, DEFAULT_TOKENIZER_PORT, ServiceTopology, local_topology)
from protos.service_logging import LOG_FORMATS, LOG_LEVELS

DEVICES = ("auto", "cpu", "cuda")
QUANTIZATIONS = ("none", "int8", "int4", "fp8")   # the engine's --quantization (engine_svc.config)
KV_CACHE_DTYPES = ("auto", "fp8")   # engine_svc.config's, repeated: the gateway does not import the engine
SPECULATIVE_METHODS = ("ngram", "draft")   # likewise


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _lora_module(text: str) -> str:
    """NAME=PATH, with PATH made absolute: the engine may not share the launcher's working directory."""
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return f"{name}={os.path.abspath(path)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tandem", description="Tandem: an LLM inference server over gRPC and an OpenAI-compatible HTTP API.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve(sub)
    _add_generate(sub)
    _add_tool_commands(sub)
    return parser



def _add_serve(sub) -> None:
    """`tandem serve`: the model and engine options, then those passed to the gateway, then the launcher's."""
    serve = sub.add_parser(
        "serve", help="start the tokenizer, engine and gateway; stop them with Ctrl-C",
        description="Start the three services and wait until they are SERVING. Arguments after `--` are "
                    "passed to the engine unchanged.",
        usage="tandem serve [options] [-- ENGINE_ARG ...]")
    serve.add_argument("--model", default=DEFAULT_MODEL,
                       help="'default' (SmolLM2-135M-Instruct, fetched on first use), an HF directory or a .gguf")
    serve.add_argument("--tokenizer-model", default=None,
                       help="take the tokenizer from this model instead (e.g. 'default' for a config.json served "
                            "with --load-format dummy, which has none); its ids must fit the engine's vocabulary")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address the public gateway and its /metrics bind (default %(default)s: this machine "
                            "only; --host 0.0.0.0 exposes them, set API keys then)")
    serve.add_argument("--port", type=int, default=DEFAULT_GATEWAY_PORT, help="public gateway port")
    serve.add_argument("--tokenizer-port", type=int, default=DEFAULT_TOKENIZER_PORT,
                       help="tokenizer service port on 127.0.0.1")
    serve.add_argument("--engine-port", type=int, default=DEFAULT_ENGINE_PORT, help="engine port on 127.0.0.1")
    serve.add_argument("--engine-replicas", type=int, default=1,
                       help="engine processes, on --engine-port and the ports after it; the gateway routes over "
                            "all of them (default %(default)s)")
    serve.add_argument("--metrics-port", type=_non_negative_int, default=DEFAULT_METRICS_PORT,
                       help="the gateway's Prometheus /metrics HTTP port, on --host (default %(default)s; 0: off)")
    serve.add_argument("--http-port", type=_non_negative_int, default=DEFAULT_HTTP_PORT,
                       help="the gateway's OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                            "/v1/models, /health, /metrics), on --host (default %(default)s; 0: off)")
    serve.add_argument("--device", choices=DEVICES, default="auto", help="engine device (default %(default)s)")
    serve.add_argument("--dtype", default="auto", help="engine dtype, e.g. auto, bfloat16, float16, float32")
    serve.add_argument("--lora", dest="lora_modules", action="append", type=_lora_module, default=[],
                       metavar="NAME=PATH", help="a PEFT adapter directory the engine loads at start as adapter "
                                                 "NAME (repeatable; turns LoRA on in the engine)")
    serve.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                       help="engine weight quantization on load: int8, int4 (group 128), fp8 (W8A8, needs "
                            "compute capability >= 8.9) (default %(default)s)")
    serve.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                       help="engine KV cache dtype: auto (the model dtype) or fp8 (e4m3, twice the tokens)")
    serve.add_argument("--tensor-parallel-size", type=_positive_int, default=1,
                       help="split the model over this many ranks in each engine (GPUs, or CPU processes); the "
                            "engine starts the worker processes itself (default %(default)s)")
    serve.add_argument("--pipeline-parallel-size", type=_positive_int, default=1,
                       help="split the model's layers into this many stages, each on --tensor-parallel-size ranks "
                            "(T x P ranks in each engine); the engine keeps P batches in flight (default "
                            "%(default)s)")
    serve.add_argument("--cpu-offload-gb", type=float, default=0.0,
                       help="keep this many GB of the model's decoder layers in host memory, streamed to the "
                            "device per step (a model a little too big for it) (default %(default)s)")
    serve.add_argument("--kv-offload-gb", type=float, default=0.0,
                       help="a host tier of this many GB for KV blocks evicted from the device, copied back on a "
                            "prefix hit instead of recomputed (default %(default)s)")
    _add_speculation(serve)
    serve.add_argument("--start-timeout", type=_positive_float, default=300.0,
                       help="seconds to wait for every service to report SERVING (default %(default)g)")
    serve.add_argument("--stop-grace", type=_positive_float, default=10.0,
                       help="seconds between SIGTERM and SIGKILL at shutdown (default %(default)g)")
    _add_gateway_options(serve)
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                       help="every service's least severe level logged (default %(default)s)")
    serve.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                       help="every service's log lines: text, or json for log shippers (default %(default)s)")
    serve.add_argument("--max-restarts", type=_non_negative_int, default=3,
                       help="restarts of one crashed service allowed within --restart-window; one more crash in "
                            "that window stops the whole stack (default %(default)s; 0: never restart)")
    serve.add_argument("--restart-window", type=_positive_float, default=300.0, metavar="SECONDS",
                       help="the sliding window --max-restarts counts over: crashes further apart never use the "
                            "restarts up; the backoff before a restart (1 s, doubled for each restart still in "
                            "the window) is back at 1 s after a service stayed up that long (default %(default)g)")


def _add_speculation(serve: argparse.ArgumentParser) -> None:
    """Speculative decoding flags, passed to the engine."""
    spec = serve.add_argument_group("speculative decoding (passed to the engine; off by default)")
    spec.add_argument("--speculative-method", choices=SPECULATIVE_METHODS,
                      help="ngram: prompt lookup; draft: a smaller model of the same tokenizer (--draft-model)")
    spec.add_argument("--num-speculative-tokens", type=_positive_int, help="tokens proposed per step (engine "
                                                                           "default 4)")
    spec.add_argument("--draft-model", help="the draft model: an HF directory or a .gguf file")
    spec.add_argument("--ngram-min", type=_positive_int, help="shortest n-gram matched (engine default 1)")
    spec.add_argument("--ngram-max", type=_positive_int, help="longest n-gram matched (engine default 4)")


def _add_gateway_options(serve: argparse.ArgumentParser) -> None:
    """Security, limits and lifecycle flags, passed to the gateway."""
    sec = serve.add_argument_group("gateway security, limits and lifecycle (passed to the gateway)")
    sec.add_argument("--api-key-file", help="API keys, one per line (or env TANDEM_API_KEYS, comma-separated); "
                                            "public RPCs then need metadata 'authorization: Bearer <key>'")
    sec.add_argument("--tls-cert", help="PEM certificate for TLS on the public port (with --tls-key)")
    sec.add_argument("--tls-key", help="PEM private key of --tls-cert")
    sec.add_argument("--tls-ca", help="CA the launcher's health probe trusts (default: --tls-cert itself)")
    sec.add_argument("--tls-server-name", help="name the probe checks the certificate against (default: the "
                                               "dialled 127.0.0.1)")
    sec.add_argument("--max-in-flight", type=_positive_int,
                     help="gateway bound on generation calls in flight (default: what the engines queue, their "
                          "max_num_seqs + max_waiting summed over replicas)")
    sec.add_argument("--max-request-bytes", type=_positive_int, help="largest public request message")
    sec.add_argument("--max-prompt-chars", type=_positive_int, help="longest prompt in characters")
    sec.add_argument("--drain-timeout", type=float, default=8.0,
                     help="on stop, seconds in-flight requests may still run (default %(default)g; --stop-grace "
                          "is raised to cover it)")


def _add_generate(sub) -> None:
    """`tandem generate`: a client of a running server."""
    gen = sub.add_parser("generate", help="stream a completion from a running server",
                         usage="tandem generate PROMPT [options]")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as one user message of a chat")
    gen.add_argument("--system", help="system message (implies --chat)")
    gen.add_argument("--max-tokens", type=_positive_int)
    gen.add_argument("--temperature", type=float, help="0 means greedy")
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="extend", nargs="+", default=[], metavar="STR", type=unescape,
                     help="stop string(s); may be given several times; \\n, \\t, \\r and \\\\ are unescaped, so "
                          "--stop '\\n\\n' stops at a blank line")
    gen.add_argument("--address", default=f"localhost:{DEFAULT_GATEWAY_PORT}", help="gateway HOST:PORT")
    gen.add_argument("--timeout", type=_positive_float, help="deadline for the whole call, in seconds")
    gen.add_argument("--tls-ca", help="connect over TLS trusting this PEM CA (without it: plaintext)")
    gen.add_argument("--tls", action="store_true", help="connect over TLS trusting the system's CAs")
    gen.add_argument("--api-key", help="sent as 'authorization: Bearer <key>' (default: env TANDEM_API_KEY)")


def _add_tool_commands(sub) -> None:
    """fetch-model, bench, eval and prune: tools that run on their own, not through the stack."""
    fetch = sub.add_parser("fetch-model", help="fetch the model (if needed) and print its path")
    fetch.add_argument("--model", default=DEFAULT_MODEL)

    bench = sub.add_parser(
        "bench", help="run a benchmark (prints a table, writes JSON)",
        description="Runs `python -m benchmarks.<module>` with the remaining arguments; --model defaults to the "
                    "default model. Benchmarks: " + ", ".join(f"{k} ({v})" for k, v in BENCHMARKS.items()),
        usage="tandem bench NAME [BENCHMARK_ARG ...]")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)

    # Listed here for `tandem --help` only: parse_args hands everything after `eval` to the module unparsed.
    sub.add_parser("eval", add_help=False, usage="tandem eval [--model M] [--modes MODE ...] [EVAL_ARG ...]",
                   help="perplexity and greedy agreement per precision/quantization mode (tandem eval --help)")
    sub.add_parser("prune", add_help=False,
                   usage="tandem prune --output DIR [--model M] [--method magnitude|wanda] [--sparsity 2:4|4:8|0.5] "
                         "[PRUNE_ARG ...]",
                   help="prune a model's decoder linears (magnitude or Wanda; 2:4, 4:8 or unstructured) into an HF "
                        "directory (tandem prune --help)")


# Benchmarks run as their own process: they import torch, which the gateway never does.
BENCHMARKS = {
    "scheduling": "benchmarks.scheduling",
    "decode": "benchmarks.engine_decode",
    "cancel": "benchmarks.cancel_latency",
    "latency": "benchmarks.latency",
    "throughput": "benchmarks.throughput",
    "sampling": "benchmarks.sampling_overhead",
    "grammar": "benchmarks.grammar_mask",
    "precision": "benchmarks.precision",
    "serve": "benchmarks.serve_load",
    "soak": "benchmarks.soak",
    "quant": "benchmarks.quant_matmul",
    "sparse": "benchmarks.sparse_matmul",
    "lora": "benchmarks.lora_throughput",
    "tp": "benchmarks.tensor_parallel",
    "spec": "benchmarks.spec_verify",
    "single-stream": "benchmarks.single_stream",
    "cpu-linears": "benchmarks.cpu_linears",
}
_NEEDS_MODEL = {"scheduling", "decode", "latency", "throughput", "sampling", "grammar", "precision", "lora", "tp"}
EVAL_MODULE = "benchmarks.quality_eval"   # it fetches the default model itself when --model is not given
PRUNE_MODULE = "engine_svc.pruning"       # it runs the engine (torch) for Wanda's calibration; given a path
_PASSTHROUGH = {"eval": "eval_args", "prune": "prune_args"}   # subcommands whose arguments their module parses


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parses argv; for `serve`, everything after the first `--` becomes `engine_args`; for `eval` (`prune`),
    everything after it becomes `eval_args` (`prune_args`): argparse would take an option there for one of its
    own."""
    if argv[:1] and argv[0] in _PASSTHROUGH:
        return argparse.Namespace(command=argv[0], **{_PASSTHROUGH[argv[0]]: list(argv[1:])})
    engine_args: list[str] = []
    if argv[:1] == ["serve"] and "--" in argv:
        cut = argv.index("--")
        argv, engine_args = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        args.engine_args = engine_args
    return args


def topology_from_args(args: argparse.Namespace, model_path: str,
                       tokenizer_path: str | None = None) -> ServiceTopology:
    return local_topology(model_path, gateway_host=args.host, gateway_port=args.port,
                          tokenizer_port=args.tokenizer_port, engine_port=args.engine_port,
                          device=args.device, dtype=args.dtype, quantization=args.quantization,
                          kv_cache_dtype=args.kv_cache_dtype, engine_extra_args=_engine_args(args),
                          tokenizer_path=tokenizer_path, lora_modules=tuple(args.lora_modules),
                          engine_replicas=args.engine_replicas,
                          metrics_port=args.metrics_port, http_port=args.http_port,
                          gateway_tls_cert=args.tls_cert, gateway_tls_key=args.tls_key, gateway_tls_ca=args.tls_ca,
                          gateway_tls_server_name=args.tls_server_name, log_level=args.log_level,
                          log_format=args.log_format, gateway_extra_args=gateway_args_from_args(args))


def _engine_args(args: argparse.Namespace) -> tuple[str, ...]:
    sizes = []
    for flag, size in (("--tensor-parallel-size", args.tensor_parallel_size),
                       ("--pipeline-parallel-size", args.pipeline_parallel_size)):
        if size > 1:
            sizes += [flag, str(size)]
    for flag, gb in (("--cpu-offload-gb", args.cpu_offload_gb), ("--kv-offload-gb", args.kv_offload_gb)):
        if gb:
            sizes += [flag, f"{gb:g}"]
    for flag, value in (("--speculative-method", args.speculative_method),
                        ("--num-speculative-tokens", args.num_speculative_tokens),
                        ("--draft-model", args.draft_model and os.path.abspath(args.draft_model)),
                        ("--ngram-min", args.ngram_min), ("--ngram-max", args.ngram_max)):
        if value is not None:
            sizes += [flag, str(value)]
    return (*sizes, *args.engine_args)


def gateway_args_from_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The gateway flags `tandem serve` passes on; files are made absolute (the gateway may run elsewhere)."""
    out = ["--drain-timeout", f"{args.drain_timeout:g}"]
    if args.api_key_file:
        out += ["--api-key-file", os.path.abspath(args.api_key_file)]
    for flag in ("max_in_flight", "max_request_bytes", "max_prompt_chars"):
        value = getattr(args, flag)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    return tuple(out)


def launcher_config_from_args(args: argparse.Namespace) -> LauncherConfig:
    # The gateway is stopped first and drains for up to --drain-timeout; it must not be killed meanwhile.
    return LauncherConfig(start_timeout_s=args.start_timeout, stop_grace_s=max(args.stop_grace,
                                                                               args.drain_timeout + 5.0),
                          max_restarts=args.max_restarts, restart_window_s=args.restart_window)


def generate_options_from_args(args: argparse.Namespace) -> GenerateOptions:
    return GenerateOptions(prompt=args.prompt, chat=args.chat, system=args.system, max_tokens=args.max_tokens,
                           temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                           stop=tuple(args.stop))


def _serve(args: argparse.Namespace) -> int:
    model = resolve_model(args.model)  # the default model is fetched here, with pip's progress bar
    tokenizer = str(resolve_model(args.tokenizer_model)) if args.tokenizer_model else None
    return run_stack(topology_from_args(args, str(model), tokenizer), launcher_config_from_args(args))


def _generate(args: argparse.Namespace) -> int:
    return run_generate(generate_options_from_args(args), args.address, args.timeout,
                        connection=ConnectionOptions(tls=args.tls or bool(args.tls_ca), tls_ca=args.tls_ca,
                                                     api_key=args.api_key or os.environ.get("TANDEM_API_KEY")))


def _fetch_model(args: argparse.Namespace) -> int:
    print(resolve_model(args.model))
    return 0


def with_model(module_args: list[str], default_model: str | None = None) -> list[str]:
    """module_args with --model set to a path: the default model's (fetched on first use) when it is absent or
    'default'. The modules run torch, and the engine never imports the gateway's fetcher."""
    if "--model" not in module_args:
        return ["--model", default_model or str(resolve_model(DEFAULT_MODEL))] + module_args
    i = module_args.index("--model") + 1
    if module_args[i:i + 1] == ["default"]:
        return module_args[:i] + [default_model or str(resolve_model(DEFAULT_MODEL))] + module_args[i + 1:]
    return module_args


def bench_command(args: argparse.Namespace, default_model: str | None = None) -> list[str]:
    extra = list(args.bench_args)
    if args.name in _NEEDS_MODEL:
        extra = with_model(extra, default_model)
    return [sys.executable, "-m", BENCHMARKS[args.name], *extra]


def _bench(args: argparse.Namespace) -> int:
    return subprocess.call(bench_command(args))


def eval_command(args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", EVAL_MODULE, *args.eval_args]


def _eval(args: argparse.Namespace) -> int:
    return subprocess.call(eval_command(args))


def prune_command(args: argparse.Namespace, default_model: str | None = None) -> list[str]:
    prune_args = list(args.prune_args)
    if not {"-h", "--help"} & set(prune_args):
        prune_args = with_model(prune_args, default_model)
    return [sys.executable, "-m", PRUNE_MODULE, *prune_args]


def _prune(args: argparse.Namespace) -> int:
    return subprocess.call(prune_command(args))


_COMMANDS = {"serve": _serve, "generate": _generate, "fetch-model": _fetch_model, "bench": _bench, "eval": _eval,
             "prune": _prune}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        code = _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # Bad values caught by the frozen configs' validation, a missing model, a failed download.
        print(f"error: {err}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:  # e.g. Ctrl-C during the model download, before the launcher handles signals
        print("interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
