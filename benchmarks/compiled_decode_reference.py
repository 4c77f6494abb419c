"""A same-run anchor for batch-1 decode: a plain Llama decoded by gpt-fast's published method, at the shapes the
engine's benchmarks take, for a machine with no network and no gpt-fast (benchmarks/gpu/issue16.py runs it next to
benchmarks.latency; issue 16's target is Tandem >= 1.3x it at SmolLM2-135M shapes). Prints a table, writes JSON.

    python -m benchmarks.compiled_decode_reference --model smollm2-135m --device cuda --prompt-len 128 \
        --output-len 128
    python -m benchmarks.compiled_decode_reference --model smollm2-135m --device cpu --compile default

The method, written here from its description:
- the model: RMSNorm, RoPE in the HF (rotate-half) layout, GQA, SwiGLU, tied or untied lm_head, q/k/v in one fused
  projection;
- a KV cache preallocated for prompt + output tokens, [layers, 1, kv_heads, max_len, head_dim]: a step writes its
  positions with index_copy_ and attends over the whole cache under a mask of the positions filled, so every decode
  step has one static shape;
- the prefill runs eager; the decode step (one token in, its greedy argmax out) is torch.compile'd with
  fullgraph=True, mode="reduce-overhead" (CUDA graphs) on CUDA, through SDPA's math backend, with inductor's
  coordinate-descent tuning;
- the tokens stay on the device until the request ends (--sync-each-token syncs after every token, as a server
  that streams must).
--model is what the engine's benchmarks take (benchmarks/model_arg.py): an HF directory (its weights are loaded),
a config .json or a shipped config's short name (random weights). Decode tok/s is measured as benchmarks.latency
measures it: the tokens after the first over the time after the first, the median of --repeats runs after --warmup
runs, on the same random prompts (same seed, same draws).
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.latency import random_prompt
from benchmarks.model_arg import resolve_model
from benchmarks.report import write_json
from engine_svc.loader import read_model_config
from engine_svc.model_config import ModelConfig

METHOD = "compiled static-cache decode (gpt-fast's method)"
COMPILE_MODES = ("auto", "reduce-overhead", "default", "eager")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_plain_llama(cfg: ModelConfig) -> None:
    """ValueError unless the config is a Llama this model computes exactly (no biases, SiLU, known RoPE scaling)."""
    extra = cfg.extra
    if cfg.architecture != "LlamaForCausalLM":
        raise ValueError(f"the reference is a plain Llama; {cfg.name} is {cfg.architecture}")
    if extra.get("attention_bias") or extra.get("mlp_bias"):
        raise ValueError(f"the reference has no biases; {cfg.name} sets attention_bias or mlp_bias")
    if extra.get("hidden_act", "silu") != "silu":
        raise ValueError(f"the reference's MLP is SwiGLU; {cfg.name} has hidden_act {extra['hidden_act']!r}")


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """The rotary frequencies (float32), scaled as the config's rope_scaling says (linear or llama3)."""
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    if s["rope_type"] != "llama3":
        raise ValueError(f"rope scaling {s['rope_type']!r} is not in the reference (linear, llama3)")
    # Llama 3.1: wavelengths above the low-frequency bound are stretched by factor, those below the high-frequency
    # bound kept, and the band between interpolated linearly in old_context / wavelength.
    old = s["original_max_position_embeddings"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    wavelen = 2 * math.pi / inv
    smooth = ((old / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv / s["factor"] + smooth * inv


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                                              cfg.rms_norm_eps)
        q, kv, d = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size
        self.split = (q, kv, kv)
        self.attn_norm = nn.Parameter(torch.empty(d))
        self.wqkv = nn.Linear(d, q + 2 * kv, bias=False)
        self.wo = nn.Linear(q, d, bias=False)
        self.mlp_norm = nn.Parameter(torch.empty(d))
        self.w_gate = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.w_up = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, d, bias=False)

    def forward(self, x, cos, sin, mask, pos, k_cache, v_cache):
        """x [1, T, d] at positions pos [T]; k_cache / v_cache [1, kv_heads, max_len, head_dim], written at pos."""
        t = x.shape[1]
        q, k, v = self.wqkv(rms_norm(x, self.attn_norm, self.eps)).split(self.split, dim=-1)
        q = rotate(q.view(1, t, self.heads, self.head_dim).transpose(1, 2), cos, sin)
        k = rotate(k.view(1, t, self.kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v.view(1, t, self.kv_heads, self.head_dim).transpose(1, 2))
        group = self.heads // self.kv_heads
        keys, values = k_cache.repeat_interleave(group, dim=1), v_cache.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.wo(o.transpose(1, 2).reshape(1, t, self.heads * self.head_dim))
        h = rms_norm(x, self.mlp_norm, self.eps)
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


class StaticCacheLlama(nn.Module):
    """Batch 1, at most max_len positions. forward(tokens [1, T], pos [T]) -> the last position's logits [1, vocab].
    Positions past those filled may hold an earlier request's keys: the mask keeps them out, so a new request needs
    no reset (the cache starts zeroed: never-written memory could hold NaN, which a mask does not remove)."""

    def __init__(self, cfg: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.empty(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        cache = (cfg.num_layers, 1, cfg.num_kv_heads, max_len, cfg.head_dim)
        for name, shape in (("k_cache", cache), ("v_cache", cache), ("cos", (max_len, cfg.head_dim)),
                            ("sin", (max_len, cfg.head_dim))):
            self.register_buffer(name, torch.empty(shape), persistent=False)
        self.register_buffer("causal", torch.empty(max_len, max_len, dtype=torch.bool), persistent=False)

    def fill_buffers(self) -> None:
        """The RoPE tables, the causal mask and a zeroed cache, on the model's device (after to_empty)."""
        device = self.k_cache.device
        freqs = torch.outer(torch.arange(self.max_len, device=device).float(),
                            rope_inv_freq(self.cfg).to(device))
        angles = torch.cat((freqs, freqs), dim=-1)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())
        self.causal.copy_(torch.ones(self.max_len, self.max_len, dtype=torch.bool, device=device).tril())
        self.k_cache.zero_()
        self.v_cache.zero_()

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        cos, sin, mask = self.cos[pos], self.sin[pos], self.causal[pos][None, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, pos, self.k_cache[i], self.v_cache[i])
        x = rms_norm(x[:, -1], self.norm, self.cfg.rms_norm_eps)
        return F.linear(x, self.embed.weight if self.lm_head is None else self.lm_head.weight)


def fill_random(model: StaticCacheLlama, seed: int) -> None:
    g = torch.Generator(device=model.k_cache.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() > 1:
            p.normal_(0.0, 0.02, generator=g)
        else:
            p.fill_(1.0)


def load_hf_weights(model: StaticCacheLlama, tensors) -> None:
    """Fills the model from (name, tensor) pairs named as an HF LlamaForCausalLM checkpoint names them."""
    got = dict(tensors)

    def take(name: str) -> torch.Tensor:
        if name not in got:
            raise ValueError(f"the checkpoint lacks {name}")
        return got.pop(name)

    model.embed.weight.copy_(take("model.embed_tokens.weight"))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        layer.wqkv.weight.copy_(torch.cat([take(f"{p}self_attn.{n}_proj.weight") for n in "qkv"]))
        layer.wo.weight.copy_(take(f"{p}self_attn.o_proj.weight"))
        layer.attn_norm.copy_(take(f"{p}input_layernorm.weight"))
        layer.mlp_norm.copy_(take(f"{p}post_attention_layernorm.weight"))
        for ours, theirs in (("w_gate", "gate"), ("w_up", "up"), ("w_down", "down")):
            getattr(layer, ours).weight.copy_(take(f"{p}mlp.{theirs}_proj.weight"))
    model.norm.copy_(take("model.norm.weight"))
    if model.lm_head is not None:
        model.lm_head.weight.copy_(take("lm_head.weight"))
    else:
        got.pop("lm_head.weight", None)   # a tied checkpoint may still save the shared matrix twice
    left = [name for name in got if not name.endswith("rotary_emb.inv_freq")]
    if left:
        raise ValueError(f"the checkpoint holds weights a plain Llama has no place for: {sorted(left)[:5]}")


@torch.no_grad()
def build(model_path: str, max_len: int, device: torch.device, dtype: torch.dtype, random_weights: bool,
          seed: int = 0) -> StaticCacheLlama:
    cfg = read_model_config(Path(model_path))
    check_plain_llama(cfg)
    with torch.device("meta"):
        model = StaticCacheLlama(cfg, max_len).to(dtype)   # floating tensors only: the mask stays bool
    model = model.to_empty(device=device)
    model.fill_buffers()
    if random_weights:
        fill_random(model, seed)
    else:
        from engine_svc.loader.hf_loader import iter_safetensors
        load_hf_weights(model, iter_safetensors(Path(model_path)))
    return model.requires_grad_(False).eval()


def decode_step(model: StaticCacheLlama, token: torch.Tensor, pos: torch.Tensor):
    """One greedy token: token [1, 1] at pos [1] -> (the next token [1, 1], its logits [1, vocab])."""
    logits = model(token, pos)
    return logits.argmax(dim=-1, keepdim=True), logits


def compile_mode(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "reduce-overhead" if device.type == "cuda" else "eager"


def make_step(mode: str, model: StaticCacheLlama, coordinate_descent: bool):
    if mode == "eager":
        return decode_step
    if coordinate_descent:   # a process-wide inductor setting: set only when asked for, never reset
        import torch._inductor.config as inductor
        inductor.coordinate_descent_tuning = True
    # The cache is written in place every step: its address is fixed, so CUDA graphs neither copy it nor skip it.
    torch._dynamo.mark_static_address(model.k_cache)
    torch._dynamo.mark_static_address(model.v_cache)
    return torch.compile(decode_step, mode=None if mode == "default" else mode, fullgraph=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Generation:
    tokens: list[int]
    last_logits: torch.Tensor   # the logits the last token was drawn from
    ttft_s: float
    decode_s: float


@torch.no_grad()
def generate(model: StaticCacheLlama, step, prompt: list[int], n: int, sync_each_token: bool = False) -> Generation:
    """n greedy tokens after prompt: an eager prefill, then n - 1 decode steps, timed apart."""
    if not prompt or len(prompt) + n > model.max_len:
        raise ValueError(f"prompt {len(prompt)} + {n} tokens do not fit the cache ({model.max_len} positions)")
    device = model.k_cache.device
    ids = torch.tensor([prompt], device=device)
    sync(device)
    t0 = time.perf_counter()
    token = model(ids, torch.arange(len(prompt), device=device)).argmax(dim=-1, keepdim=True)
    sync(device)
    t1 = time.perf_counter()
    out, logits = [token], None
    pos = torch.tensor([len(prompt)], device=device)
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(n - 1):
            token, logits = step(model, token, pos)
            token = token.clone()   # a CUDA graph's outputs are overwritten by its next replay
            out.append(token)
            pos += 1
            if sync_each_token:
                sync(device)
        last = logits.clone() if logits is not None else None
    sync(device)
    t2 = time.perf_counter()
    return Generation(torch.cat(out).flatten().tolist(), last, t1 - t0, t2 - t1)


@contextmanager
def ticking(what: str, every_s: float = 10.0):
    """Prints how long `what` has taken every every_s seconds until the block ends."""
    stop, t0 = threading.Event(), time.monotonic()

    def tick() -> None:
        while not stop.wait(every_s):
            print(f"[reference] {what}: {time.monotonic() - t0:.0f} s so far", file=sys.stderr, flush=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@torch.no_grad()
def compile_step(model: StaticCacheLlama, step, mode: str) -> float:
    """Seconds until the step runs as it will when timed: tracing, inductor, autotuning and (reduce-overhead) the
    CUDA-graph warm-up and recording, which take three calls."""
    device = model.k_cache.device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    print(f"[reference] compiling the decode step (torch.compile mode={mode}, fullgraph=True)", file=sys.stderr,
          flush=True)
    t0 = time.perf_counter()
    with ticking("compiling"), sdpa_kernel(SDPBackend.MATH):
        for _ in range(3):
            step(model, token, pos)[0].clone()
        sync(device)
    seconds = time.perf_counter() - t0
    print(f"[reference] compiled in {seconds:.1f} s", file=sys.stderr, flush=True)
    return seconds


def cudagraph_skips() -> int:
    """CUDA-graph fallbacks inductor counted (a graph it could not capture runs without one)."""
    from torch._dynamo.utils import counters
    return int(counters["inductor"]["cudagraph_skips"])


def decode_bench(model: StaticCacheLlama, step, args) -> dict:
    rng = random.Random(args.seed)   # the draws benchmarks.latency makes: the same prompts
    vocab = model.cfg.vocab_size
    for i in range(args.warmup):
        generate(model, step, random_prompt(rng, args.prompt_len, vocab), args.output_len, args.sync_each_token)
    runs = []
    for i in range(args.repeats):
        g = generate(model, step, random_prompt(rng, args.prompt_len, vocab), args.output_len, args.sync_each_token)
        runs.append({"ttft_s": g.ttft_s, "decode_s": g.decode_s, "decode_tok_s": (args.output_len - 1) / g.decode_s})
        print(f"  decode run {i + 1}/{args.repeats}: {runs[-1]['decode_tok_s']:.1f} tok/s", file=sys.stderr,
              flush=True)
    tok_s = [r["decode_tok_s"] for r in runs]
    med = statistics.median(tok_s)
    return {"prompt_len": args.prompt_len, "output_len": args.output_len, "repeats": args.repeats,
            "decode_tok_s_median": med, "decode_tok_s_min": min(tok_s), "decode_tok_s_max": max(tok_s),
            "ms_per_token_median": 1e3 / med, "ttft_ms_median": statistics.median(r["ttft_s"] for r in runs) * 1e3,
            "runs": runs}


def print_table(result: dict) -> None:
    d = result["decode"]
    print(f"\n{METHOD}: {result['model']} on {result['device']} ({result['dtype']}), decode step "
          f"{result['compile']}, cache of {result['max_len']} positions"
          f"{', a host sync per token' if result['sync_each_token'] else ''}")
    print(f"batch-1 decode: prompt {d['prompt_len']}, output {d['output_len']} (greedy), median of {d['repeats']}")
    print(f"{'compile s':>10} {'decode tok/s':>13} {'best':>8} {'ms/token':>9} {'TTFT ms':>8}")
    compile_s = "eager" if result["compile"] == "eager" else f"{result['compile_s']:.1f}"
    print(f"{compile_s:>10} {d['decode_tok_s_median']:>13.1f} {d['decode_tok_s_max']:>8.1f} "
          f"{d['ms_per_token_median']:>9.2f} {d['ttft_ms_median']:>8.1f}")
    if result["cudagraph_skips"]:
        print(f"warning: inductor ran {result['cudagraph_skips']} graph(s) without CUDA graphs")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compiled_decode_reference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="HF directory (its weights), config .json or shipped config short name (random weights)")
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights even for an HF directory")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on CUDA, else float32")
    p.add_argument("--compile", choices=COMPILE_MODES, default="auto",
                   help="the decode step: auto is reduce-overhead (CUDA graphs) on CUDA, eager on the CPU; default "
                        "is plain torch.compile")
    p.add_argument("--no-coordinate-descent-tuning", dest="coordinate_descent", action="store_false",
                   help="skip inductor's coordinate-descent tuning of the kernels (faster compile)")
    p.add_argument("--sync-each-token", action="store_true", help="a host sync after every decode step")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after the compile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("bench_out/compiled_decode_reference.json"))
    args = p.parse_args(argv)
    if args.prompt_len < 1 or args.output_len < 2 or args.repeats < 1 or args.warmup < 0:
        p.error("need --prompt-len >= 1, --output-len >= 2 (decode speed is measured after the first token), "
                "--repeats >= 1, --warmup >= 0")
    try:
        args.model, shipped = resolve_model(args.model)
    except FileNotFoundError as e:
        p.error(str(e))
    args.random_weights = shipped or args.load_format == "dummy" or not Path(args.model).is_dir()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no CUDA device here")
    max_len = args.prompt_len + args.output_len
    try:
        model = build(args.model, max_len, device, dtype, args.random_weights, args.seed)
    except ValueError as e:
        sys.exit(f"error: {e}")
    mode = compile_mode(args.compile, device)
    print(f"[reference] {model.cfg.name} on {device} ({args.dtype}), "
          f"{'random weights' if args.random_weights else 'its weights'}, cache of {max_len} positions, decode step "
          f"{mode}", file=sys.stderr, flush=True)
    step = make_step(mode, model, args.coordinate_descent and device.type == "cuda")
    compile_s = compile_step(model, step, mode) if mode != "eager" else 0.0
    decode = decode_bench(model, step, args)
    result = {"benchmark": "compiled_decode_reference", "method": METHOD, "model": model.cfg.name,
              "model_path": args.model, "random_weights": args.random_weights, "device": str(device),
              "dtype": args.dtype, "compile": mode,
              "coordinate_descent_tuning": args.coordinate_descent and mode != "eager" and device.type == "cuda",
              "sync_each_token": args.sync_each_token, "max_len": max_len, "compile_s": compile_s,
              "cudagraph_skips": cudagraph_skips(), "torch": torch.__version__, "decode": decode}
    print_table(result)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
