"""Turns a scheduled batch into tensors, runs the model over the paged KV cache and samples on the device."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from engine_svc.attention import AttentionMetadata, get_backend
from engine_svc.config import EngineConfig
from engine_svc.core.scheduler import SchedulerOutput
from engine_svc.loader import load_model, read_model_config
from engine_svc.memory_plan import MemoryPlan, plan_memory
from engine_svc.model_config import ModelConfig
from engine_svc.sampler import SamplingBatch, sample

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class ModelRunner:
    def __init__(self, config: EngineConfig, model_cfg: ModelConfig | None = None) -> None:
        path = Path(config.model)
        self.model_cfg = model_cfg or read_model_config(path)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.max_model_len = min(config.max_model_len or self.model_cfg.max_position_embeddings,
                                 self.model_cfg.max_position_embeddings)
        if config.max_model_len and config.max_model_len > self.model_cfg.max_position_embeddings:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's context "
                             f"{self.model_cfg.max_position_embeddings}")
        self.config = replace(config, max_model_len=self.max_model_len,
                              max_num_batched_tokens=self._token_budget(config))
        self.backend = get_backend(config.attention_backend)
        self._eos_token_ids = frozenset(self.model_cfg.eos_token_ids)
        self.block_size = config.block_size
        fmt = "dummy" if config.load_format == "dummy" else "weights"
        self.model = load_model(path, self.model_cfg, fmt, self.device, self.dtype, self.backend)
        weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.plan: MemoryPlan = plan_memory(self.config, self.model_cfg, self.max_model_len, weights_bytes,
                                            self.device, self.dtype)
        print(self.plan.describe(), file=sys.stderr, flush=True)
        shape = (2, self.plan.num_blocks, self.block_size, self.model_cfg.num_kv_heads, self.model_cfg.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(self.model_cfg.num_layers)]

    def _token_budget(self, config: EngineConfig) -> int:
        if config.max_num_batched_tokens:
            return config.max_num_batched_tokens
        if not config.enable_chunked_prefill:
            return max(self.max_model_len, 8192)
        # On a CPU a step of 2048 prompt tokens already takes about a second; a larger one only lengthens the
        # decode stall of everyone else.
        return 8192 if self.device.type == "cuda" else 2048

    @property
    def num_blocks(self) -> int:
        return self.plan.num_blocks

    def _to_device(self, data: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(data, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def prepare(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        bs = self.block_size
        max_blocks = max(len(s.request.block_ids) for s in out.scheduled)
        tables = []
        for s in out.scheduled:
            req, start, n = s.request, s.start, s.num_new_tokens
            input_ids.extend(req.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            blocks = req.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, start + n))
            query_start.append(query_start[-1] + n)
            seq_lens.append(start + n)
            tables.append(blocks + [0] * (max_blocks - len(blocks)))
            if s.samples:
                logits_rows.append(query_start[-1] - 1)
        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.int64),
            block_tables=self._to_device(tables, torch.int32),
            seq_lens=self._to_device(seq_lens, torch.int32),
            query_start=self._to_device(query_start, torch.int32),
            query_lens_cpu=[b - a for a, b in zip(query_start, query_start[1:])],
            seq_lens_cpu=seq_lens,
            block_size=bs,
        )
        return (self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64), meta,
                self._to_device(logits_rows, torch.int64))

    @torch.inference_mode()
    def forward_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Runs the model; returns float32 logits for each scheduled request that samples, in order."""
        input_ids, positions, meta, logits_rows = self.prepare(out)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden[logits_rows])

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> list[int]:
        logits = self.forward_logits(out)
        sampling = [s for s in out.scheduled if s.samples]
        if not sampling:
            return []
        params = [s.request.params for s in sampling]
        histories = None
        if any(p.uses_penalties for p in params):
            histories = [(s.request.prompt_token_ids, s.request.output_token_ids) for s in sampling]
        batch = SamplingBatch.build(params, [s.request.num_output_tokens for s in sampling],
                                    self.model_cfg.vocab_size, self.device, histories=histories,
                                    eos_token_ids=self._eos_token_ids)
        return sample(logits, batch).tolist()  # the one device-to-host copy of the step
