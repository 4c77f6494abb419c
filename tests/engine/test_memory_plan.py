"""The KV cache is sized from what is left after weights and one step's activations, and the plan says so."""
from __future__ import annotations

from pathlib import Path

import torch

from engine_svc.worker import memory_plan
from engine_svc.config import EngineConfig
from engine_svc.worker.memory_plan import GB, activation_bytes, kv_bytes_per_token, plan_memory
from engine_svc.loader import read_model_config

LLAMA3_8B = read_model_config(Path(memory_plan.__file__).parents[1] / "configs" / "llama3-8b.json")


def test_kv_bytes_per_token_of_llama3_8b_in_bf16():
    assert kv_bytes_per_token(LLAMA3_8B, torch.bfloat16) == 2 * 32 * 8 * 128 * 2 == 131072


def test_activations_grow_with_the_step_budget():
    a = activation_bytes(LLAMA3_8B, 8192, 256, torch.bfloat16)
    per_token = (4096 + 2 * 1024) + 4096 + 3 * 14336 + 4 * 4096
    assert a == 8192 * per_token * 2 + 256 * 128256 * 16
    assert activation_bytes(LLAMA3_8B, 4096, 256, torch.bfloat16) < a


def test_cuda_budget_leaves_weights_and_activations_out(monkeypatch):
    total, used = 80 * GB, 16 * GB                      # used: the weights already loaded
    monkeypatch.setattr(memory_plan.torch.cuda, "mem_get_info", lambda device: (total - used, total))
    cfg = EngineConfig(model="m", gpu_memory_utilization=0.9, block_size=16)
    act = activation_bytes(LLAMA3_8B, 8192, 64, torch.bfloat16)
    plan = plan_memory(cfg, LLAMA3_8B, 8192, used, torch.device("cuda"), torch.bfloat16, act)
    per_block = 131072 * 16
    assert plan.num_blocks == (int(total * 0.9) - used - act) // per_block
    assert plan.activation_bytes == act
    text = plan.describe()
    assert "weights 16.00 GB" in text and f"activations {act / GB:.2f} GB" in text and "131072 B/token" in text
    assert f"max {plan.num_blocks * 16} tokens" in text
