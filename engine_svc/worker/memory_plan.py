"""Sizes the KV cache: explicit block count, or what free memory allows after weights and activations.

With a draft model (speculative decoding, engine_svc.spec.draft_proposer) the draft's KV caches are indexed by
the target's block tables: every block id holds a position's K/V in both models' caches, so a block costs the sum
of their bytes and both caches have the same block count. The draft is loaded before the target's plan is made:
on CUDA the memory in use then holds its weights, and its forward (which never overlaps the target's) shares the
activation reserve."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch

from engine_svc.config import EngineConfig
from engine_svc.model_config import ModelConfig

_LOG = logging.getLogger("tandem.engine.memory")

GB = 1 << 30


@dataclass(frozen=True)
class MemoryPlan:
    weights_bytes: int
    kv_bytes_per_token: int
    block_size: int
    num_blocks: int
    kv_dtype: torch.dtype         # what the cache stores: the model dtype, or float8_e4m3fn
    activation_bytes: int = 0     # reserved for one step's transient tensors and the penalty pool (CUDA)
    offloaded_bytes: int = 0      # decoder weights kept in host memory (--cpu-offload-gb), not in weights_bytes
    bus_seconds_per_step: float = 0.0   # their copies to the device, every forward, at the measured bandwidth
    draft: "MemoryPlan | None" = None    # the draft model's own plan, over the same num_blocks (None: no draft)

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.block_size * self.num_blocks

    @property
    def max_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        offload = (f" resident + {self.offloaded_bytes / GB:.2f} GB offloaded (bus "
                   f"{self.bus_seconds_per_step * 1e3:.1f} ms/step)" if self.offloaded_bytes else "")
        return (f"memory plan: weights {self.weights_bytes / GB:.2f} GB{offload}, activations "
                f"{self.activation_bytes / GB:.2f} GB, KV cache {self.kv_bytes / GB:.2f} GB "
                f"({str(self.kv_dtype).removeprefix('torch.')}, {self.kv_bytes_per_token} B/token, "
                f"{self.num_blocks} blocks x {self.block_size} tokens), {self._describe_draft()}"
                f"max {self.max_tokens} tokens")

    def _describe_draft(self) -> str:
        d = self.draft
        if d is None:
            return ""
        return (f"draft model: weights {d.weights_bytes / GB:.2f} GB, KV cache {d.kv_bytes / GB:.2f} GB "
                f"({str(d.kv_dtype).removeprefix('torch.')}, {d.kv_bytes_per_token} B/token, the same blocks), ")


def weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each tensor once (tied weights are shared). Quantized layers
    keep their weights in buffers, so parameters alone would undercount them; a 2:4 compressed weight counts its
    stored values and metadata, not its dense shape."""
    from engine_svc.pruning.semi_sparse_linear import stored_bytes
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(stored_bytes(t) for t in tensors.values())


def kv_bytes_per_token(cfg: ModelConfig, kv_dtype: torch.dtype) -> int:
    """K and V of every layer in the cache's own dtype (1 byte an element for fp8); the per-layer fp8 scales are
    8 bytes per layer in all, not per token."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=kv_dtype).element_size()


def activation_bytes(cfg: ModelConfig, max_tokens: int, max_logits_rows: int, dtype: torch.dtype) -> int:
    """Peak transient memory of one step, estimated from the shapes: a layer's widest per-token intermediates for
    the step's tokens (qkv, attention output, gate_up and the SwiGLU product, hidden, residual and norm), plus the
    fp32 logits of the sampled rows (one per sequence; K + 1 per verify row of speculative decoding) with the
    sampler's copies (processed logits, probabilities, noise)."""
    elem = torch.empty((), dtype=dtype).element_size()
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_token = (q + 2 * kv) + q + 3 * cfg.intermediate_size + 4 * cfg.hidden_size
    return max_tokens * per_token * elem + max_logits_rows * cfg.vocab_size * 4 * 4


def plan_memory(config: EngineConfig, cfg: ModelConfig, max_model_len: int, weights_bytes: int,
                device: torch.device, kv_dtype: torch.dtype, activation_peak_bytes: int = 0,
                draft: MemoryPlan | None = None) -> MemoryPlan:
    """kv_dtype: the dtype the KV cache stores (engine_svc.attention.kv_cache.cache_dtype); draft: the loaded draft
    model's plan (its block count is replaced by this plan's)."""
    per_token = kv_bytes_per_token(cfg, kv_dtype)
    per_block = (per_token + (draft.kv_bytes_per_token if draft else 0)) * config.block_size
    if draft is not None:
        activation_peak_bytes = max(activation_peak_bytes, draft.activation_bytes)
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * config.gpu_memory_utilization) - used - activation_peak_bytes
        num_blocks = budget // per_block
    else:
        budget = int(config.cpu_kv_cache_gb * GB) if config.cpu_kv_cache_gb else min(2 * GB, _available_ram() // 4)
        # Never more than every sequence at full length needs.
        cap = -(-max_model_len // config.block_size) * config.max_num_seqs
        num_blocks = min(budget // per_block, cap)
    if num_blocks < -(-max_model_len // config.block_size) and config.num_kv_blocks is None:
        _LOG.warning("KV cache holds %d tokens, less than one full-length sequence (%d)",
                     num_blocks * config.block_size, max_model_len)
    if num_blocks < 1:
        raise MemoryError(f"no memory left for the KV cache (needs {per_block} bytes per block)")
    return MemoryPlan(weights_bytes, per_token, config.block_size, int(num_blocks), kv_dtype,
                      activation_peak_bytes if device.type == "cuda" else 0,
                      draft=None if draft is None else replace(draft, num_blocks=int(num_blocks)))


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
