"""The scheduler's settings, and what a request must satisfy to be admitted under them. Plain Python: no torch."""
from __future__ import annotations

from dataclasses import dataclass

from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import SamplingParams


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    max_waiting: int = 1024
    enable_chunked_prefill: bool = True
    max_loras: int | None = None   # distinct adapters among running requests; None: no limit
    num_speculative_tokens: int = 0   # K: proposals per decoding request and step (0: no speculation)

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_loras is not None and self.max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        if self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                             "(a whole prompt must fit in one step)")


class AdmissionError(ValueError):
    """The request can never run on this engine."""

    def __init__(self, message: str, no_capacity: bool) -> None:
        super().__init__(message)
        self.no_capacity = no_capacity


def check_request(config: SchedulerConfig, kv: KVCacheManager, n: int, params: SamplingParams) -> None:
    """Raises AdmissionError for a request (n prompt tokens) that can never run under config with kv's blocks."""
    if params.best_of > config.max_num_seqs:
        raise AdmissionError(f"best_of (or the beam width) {params.best_of} exceeds the engine's max_num_seqs "
                             f"{config.max_num_seqs}", no_capacity=False)
    if n == 0:
        raise AdmissionError("prompt is empty", no_capacity=False)
    if n >= config.max_model_len:
        raise AdmissionError(
            f"prompt has {n} tokens; the model's context is {config.max_model_len} and leaves no room "
            f"to generate", no_capacity=False)
    # A request must fit alone at its longest, or preemption could never make room for it.
    longest = min(n + params.max_tokens, config.max_model_len)
    if kv.blocks_for_tokens(longest) > kv.num_blocks:
        raise AdmissionError(
            f"prompt + max_tokens reach {longest} tokens, which need {kv.blocks_for_tokens(longest)} KV "
            f"blocks; the whole cache has {kv.num_blocks}", no_capacity=True)
