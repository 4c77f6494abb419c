"""Engine configuration: parsed from the command line, validated once, frozen."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from protos.service_logging import add_logging_args, check_logging

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
LOAD_FORMATS = ("auto", "dummy")
ATTENTION_BACKENDS = ("auto", "torch", "triton")
QUANTIZATIONS = ("none", "int8", "int4", "fp8")   # weight formats: see engine_svc.quant
INT4_GEMV_LAYOUTS = ("plain", "shuffled")          # what the Triton int4 GEMV reads: engine_svc.quant.int4_gemv_layout
KV_CACHE_DTYPES = ("auto", "fp8")                  # auto: the model dtype; fp8: e4m3 with per-layer scales
SPARSITY_KERNELS = ("auto", "on", "off")           # 2:4 pruned checkpoints: see engine_svc.pruning.sparse_serving
DISTRIBUTED_EXECUTORS = ("mp", "ray")
SPECULATIVE_METHODS = ("ngram", "draft")          # see engine_svc.spec
MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class EngineConfig:
    model: str
    load_format: str = "auto"
    served_model_name: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"             # auto: triton on CUDA, torch on the CPU
    quantization: str = "none"                  # none: the checkpoint's own format (AWQ/GPTQ are detected)
    int4_gemv_layout: str = "plain"             # plain, or shuffled at load (an experiment until a GPU measures it)
    kv_cache_dtype: str = "auto"
    sparsity_kernels: str = "auto"              # a 2:4 checkpoint's linears on the sparse kernels where faster
    block_size: int = 16
    num_kv_blocks: int | None = None            # explicit KV size; otherwise taken from free memory
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float | None = None        # CPU KV budget; default: a quarter of available memory, max 2 GB
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None   # token budget per step; default 8192 (CUDA) or 2048 (CPU)
    max_waiting: int = 1024                     # admitted but not yet running; past it: RESOURCE_EXHAUSTED
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    check_kv_integrity: bool = False            # check the KV invariants each time the engine goes idle
    enforce_eager: bool = False                 # no CUDA graphs for decode
    async_scheduling: bool | None = None        # launch step k+1 before reading step k's ids; None: on CUDA only
    max_model_len: int | None = None            # default: the model's context
    enable_lora: bool = False                   # wrap the projections with LoRA layers (off: the base path only)
    max_loras: int = 4                          # adapters resident on the device (distinct adapters per step)
    max_lora_rank: int = 64                     # slots are sized for this rank; a larger adapter is refused
    max_cpu_loras: int = 16                     # adapters loaded (CPU copies) at once
    host: str = "127.0.0.1"
    port: int = 50053
    lora_modules: tuple[tuple[str, str], ...] = ()   # (name, path) of the LoRA adapters loaded at start (--lora)
    tensor_parallel_size: int = 1               # ranks each pipeline stage's layers are split over
    pipeline_parallel_size: int = 1             # stages the layers are split into; T x P ranks in all
    distributed_executor: str = "mp"            # how the ranks run: mp, worker processes on this node; ray, actors
    ray_address: str | None = None              # the Ray cluster (ray executor); None: Ray's own resolution
    distributed_timeout_s: float = 600.0        # a collective waiting longer fails the engine
    kv_offload_gb: float = 0.0                  # host tier of the KV cache (pinned memory); 0: none
    cpu_offload_gb: float = 0.0                 # decoder weights kept in host memory, streamed in per layer
    speculative_method: str | None = None       # None: no speculation; ngram: prompt lookup; draft: a draft model
    num_speculative_tokens: int = 4             # K: tokens proposed per step and verified in one forward
    draft_model: str | None = None              # the draft model's path (method draft): same vocabulary
    ngram_min: int = 1                          # prompt lookup matches the context's last n tokens, n from
    ngram_max: int = 4                          # ngram_max down to ngram_min
    log_level: str = "info"                     # every log line, the worker ranks' too
    log_format: str = "text"                    # text or json (protos/service_logging.py)
    cpu_threads: int | None = None              # torch threads on the CPU; None: torch's own (worker/cpu_threads.py)

    def __post_init__(self) -> None:
        check_logging(self.log_level, self.log_format)
        checks = [
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}"),
            (self.load_format in LOAD_FORMATS, f"load_format must be one of {LOAD_FORMATS}"),
            (self.attention_backend in ATTENTION_BACKENDS, f"attention_backend must be one of {ATTENTION_BACKENDS}"),
            (self.quantization in QUANTIZATIONS, f"quantization must be one of {QUANTIZATIONS}"),
            (self.int4_gemv_layout in INT4_GEMV_LAYOUTS, f"int4_gemv_layout must be one of {INT4_GEMV_LAYOUTS}"),
            (self.kv_cache_dtype in KV_CACHE_DTYPES, f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}"),
            (self.sparsity_kernels in SPARSITY_KERNELS, f"sparsity_kernels must be one of {SPARSITY_KERNELS}"),
            (not (self.sparsity_kernels == "on" and (self.enable_lora or self.lora_modules)),
             "sparsity_kernels on cannot serve LoRA adapters (their layers multiply the dense weight); use auto "
             "or off"),
            (self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size must be a power of two <= 128"),
            (self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1"),
            (0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization must be in (0, 1]"),
            (self.cpu_kv_cache_gb is None or self.cpu_kv_cache_gb > 0, "cpu_kv_cache_gb must be > 0"),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_model_len is None or self.max_model_len >= 2, "max_model_len must be >= 2"),
            (self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
             "max_num_batched_tokens must be >= 1"),
            (self.max_waiting >= 1, "max_waiting must be >= 1"),
            (self.max_loras >= 1, "max_loras must be >= 1"),
            (1 <= self.max_lora_rank <= 512, "max_lora_rank must be in [1, 512]"),
            (self.max_cpu_loras >= self.max_loras, "max_cpu_loras must be >= max_loras"),
            (0 <= self.port < 65536, "port must be in [0, 65535]"),
            (self.tensor_parallel_size >= 1, "tensor_parallel_size must be >= 1"),
            (self.pipeline_parallel_size >= 1, "pipeline_parallel_size must be >= 1"),
            (self.distributed_executor in DISTRIBUTED_EXECUTORS,
             f"distributed_executor must be one of {DISTRIBUTED_EXECUTORS}"),
            (self.distributed_timeout_s > 0, "distributed_timeout_s must be > 0"),
            (self.ray_address is None or self.distributed_executor == "ray",
             "ray_address needs distributed_executor ray"),
            (not (self.ray_address or "").startswith("ray://"),
             "ray_address: Ray Client (ray://) is not supported: run the engine on a node of the cluster"),
            (self.kv_offload_gb >= 0, "kv_offload_gb must be >= 0"),
            (self.cpu_offload_gb >= 0, "cpu_offload_gb must be >= 0"),
            (self.cpu_threads is None or self.cpu_threads >= 1, "cpu_threads must be >= 1"),
            (self.world_size == 1 or not (self.kv_offload_gb or self.cpu_offload_gb),
             "kv_offload_gb and cpu_offload_gb need tensor_parallel_size and pipeline_parallel_size 1 (the "
             "multi-rank step broadcast does not carry their copies)"),
            (not self.kv_offload_gb or self.enable_prefix_caching,
             "kv_offload_gb needs prefix caching (the host tier is keyed by its block hashes)"),
            (not (self.cpu_offload_gb and (self.enable_lora or self.lora_modules)),
             "cpu_offload_gb cannot be combined with LoRA (adapter slots live in the offloaded layers)"),
        ]
        checks += self._speculative_checks()
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _speculative_checks(self) -> list[tuple[bool, str]]:
        method = self.speculative_method
        return [
            (method is None or method in SPECULATIVE_METHODS,
             f"speculative_method must be one of {SPECULATIVE_METHODS}"),
            (1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS,
             f"num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}]"),
            ((method == "draft") == (self.draft_model is not None),
             "speculative_method draft needs draft_model, and draft_model needs speculative_method draft"),
            (1 <= self.ngram_min <= self.ngram_max, "need 1 <= ngram_min <= ngram_max"),
            (method is None or self.world_size == 1,
             "speculative decoding is not supported with tensor or pipeline parallelism yet"),
        ]

    @property
    def world_size(self) -> int:
        """Ranks holding the model: tensor_parallel_size x pipeline_parallel_size (1: the engine process alone)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine_svc", description="Tandem engine service (token ids in, out).")
    p.add_argument("--model", required=True, help="HF directory, .gguf file, or config.json with --load-format dummy")
    p.add_argument("--load-format", default="auto", choices=LOAD_FORMATS)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--attention-backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="auto: triton on CUDA, torch on the CPU")
    p.add_argument("--quantization", default="none", choices=QUANTIZATIONS,
                   help="weight quantization on load: int8 (per channel), int4 (group 128, RTN), fp8 (W8A8, "
                        "Hopper/Ada); AWQ and GPTQ checkpoints are detected from their config")
    p.add_argument("--int4-gemv-layout", default="plain", choices=INT4_GEMV_LAYOUTS,
                   help="int4 linears on the Triton kernels: shuffled also keeps a copy of the weight rearranged at "
                        "load for the GEMV (decode at batch <= 4); an experiment, not yet measured on a GPU")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto: the model dtype; fp8: e4m3 (twice the tokens)")
    p.add_argument("--sparsity-kernels", default="auto", choices=SPARSITY_KERNELS,
                   help="2:4 pruned checkpoints (tandem prune): auto runs each linear shape on the semi-structured "
                        "sparse kernels (CUDA, compute capability >= 8.0, fp16/bf16) where it measures faster at "
                        "load; on requires them; off serves the pruned weights dense")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--cpu-kv-cache-gb", type=float, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="sequences in one step's batch; with --pipeline-parallel-size P, in each of the P batches "
                        "in flight (P x this many run at once)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step, shared by decodes and prefill chunks "
                        "(default: 8192 on CUDA, 2048 on CPU)")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="bound of the waiting queue; past it, requests get RESOURCE_EXHAUSTED")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn automatic prefix caching off")
    p.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   help="compute each prompt in one step (the budget must then hold max_model_len)")
    p.add_argument("--check-kv-integrity", action="store_true",
                   help="check block-pool invariants whenever the engine goes idle (one pass over the blocks)")
    p.add_argument("--enforce-eager", action="store_true", help="run decode eagerly, without CUDA graphs")
    p.add_argument("--async-scheduling", dest="async_scheduling", action="store_true", default=None,
                   help="schedule and prepare step k+1 while the device runs step k (default on CUDA)")
    p.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (PEFT directories)")
    p.add_argument("--max-loras", type=int, default=4, help="adapters resident on the device at once")
    p.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank accepted")
    p.add_argument("--max-cpu-loras", type=int, default=16, help="adapters loaded at once (CPU copies)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50053)
    p.add_argument("--lora", dest="lora_modules", action="append", type=lora_module, default=[],
                   metavar="NAME=PATH", help="load the PEFT adapter directory PATH as adapter NAME at start "
                                             "(repeatable; implies --enable-lora)")
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split the model over this many ranks (GPUs, or CPU processes): Megatron-style tensor "
                        "parallelism, one worker process per rank beyond the engine's own")
    p.add_argument("--pipeline-parallel-size", type=int, default=1,
                   help="split the layers into this many stages, each on its own tensor-parallel group of ranks "
                        "(T x P ranks in all); the engine keeps P batches in flight so the stages overlap")
    p.add_argument("--distributed-executor", default="mp", choices=DISTRIBUTED_EXECUTORS,
                   help="mp: the ranks are worker processes on this node; ray: Ray actors placed on a Ray cluster, "
                        "on one node or several (install tandem[ray])")
    p.add_argument("--ray-address", default=None,
                   help="with --distributed-executor ray: the cluster's address, as ray.init takes it (HOST:PORT "
                        "of its head; auto: an existing cluster or fail; local: a new local Ray); default: "
                        "$RAY_ADDRESS, else the cluster `ray start` started on this machine, else a new local Ray")
    p.add_argument("--distributed-timeout-s", type=float, default=600.0,
                   help="a collective that waits longer fails the engine (it exits naming the rank)")
    p.add_argument("--kv-offload-gb", type=float, default=0.0,
                   help="keep KV blocks evicted from the device in a host tier of this many GB (pinned memory) "
                        "and copy them back on a prefix hit instead of recomputing them (needs prefix caching)")
    p.add_argument("--cpu-offload-gb", type=float, default=0.0,
                   help="keep this many GB of decoder layers in host memory and stream each to the device just "
                        "before it runs (serves a model a little too big for the device; decode runs eagerly)")
    add_logging_args(p)
    p.add_argument("--cpu-threads", type=int, default=None,
                   help="torch threads of the engine on the CPU (default: torch's own, the cores); the CPU default's "
                        "single-token steps (GEMVs over a Q4 GGUF's blocks) run on one thread whatever the count")
    spec = p.add_argument_group("speculative decoding (off by default; see the README)")
    spec.add_argument("--speculative-method", default=None, choices=SPECULATIVE_METHODS,
                      help="ngram: propose the tokens that followed the context's last n-gram earlier in it; "
                           "draft: a smaller model of the same tokenizer proposes them (--draft-model)")
    spec.add_argument("--num-speculative-tokens", type=int, default=4,
                      help="tokens proposed per step; the model verifies them in one forward")
    spec.add_argument("--draft-model", default=None, help="the draft model (HF directory or .gguf)")
    spec.add_argument("--ngram-min", type=int, default=1, help="shortest n-gram prompt lookup matches")
    spec.add_argument("--ngram-max", type=int, default=4, help="longest n-gram prompt lookup matches (tried first)")
    return p


def lora_module(text: str) -> tuple[str, str]:
    """NAME=PATH of --lora."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def config_from_args(argv: list[str] | None = None) -> EngineConfig:
    args = build_parser().parse_args(argv)
    values = vars(args)
    values["lora_modules"] = tuple(values["lora_modules"])
    values["enable_lora"] |= bool(values["lora_modules"])
    return EngineConfig(**values)
