"""The KV cache is sized from what is left after weights and one step's activations (and a draft model's weights
and KV cache), and the plan says so."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from engine_svc.executor.uniproc import UniProcExecutor
from engine_svc.loader import read_model_config
from engine_svc.worker import memory_plan
from engine_svc.worker.memory_plan import GB, MemoryPlan, activation_bytes, kv_bytes_per_token, plan_memory
from engine_svc.worker.model_runner import ModelRunner
from tests.engine.tiny_models import write_tiny_llama

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


LLAMA32_1B = read_model_config(Path(memory_plan.__file__).parents[1] / "configs" / "llama3.2-1b.json")


def test_a_draft_model_is_counted_before_the_kv_cache_is_sized(monkeypatch):
    """Speculative decoding with a draft: the draft is loaded before the plan (the memory in use holds its
    weights), its K/V sit in the same blocks as the target's (a block costs both), and the two forwards share
    one activation reserve."""
    total, weights, draft_weights = 80 * GB, 16 * GB, 5 * GB // 2
    cfg = EngineConfig(model="m", gpu_memory_utilization=0.9, block_size=16)
    act = activation_bytes(LLAMA3_8B, 8192, 64 * 5, torch.bfloat16)
    draft_act = activation_bytes(LLAMA32_1B, 8192, 64, torch.bfloat16)
    draft = MemoryPlan(draft_weights, kv_bytes_per_token(LLAMA32_1B, torch.bfloat16), 16, 1, torch.bfloat16,
                       draft_act)
    assert draft.kv_bytes_per_token == 2 * 16 * 8 * 64 * 2 == 32768
    monkeypatch.setattr(memory_plan.torch.cuda, "mem_get_info", lambda device: (total - weights, total))
    alone = plan_memory(cfg, LLAMA3_8B, 8192, weights, torch.device("cuda"), torch.bfloat16, act)
    used = weights + draft_weights
    monkeypatch.setattr(memory_plan.torch.cuda, "mem_get_info", lambda device: (total - used, total))
    both = plan_memory(cfg, LLAMA3_8B, 8192, weights, torch.device("cuda"), torch.bfloat16, act, draft)
    budget = int(total * 0.9) - weights - act
    assert act > draft_act and alone.num_blocks == budget // (131072 * 16)
    assert both.num_blocks == (budget - draft_weights) // ((131072 + 32768) * 16)
    assert both.draft.num_blocks == both.num_blocks and both.activation_bytes == act
    assert both.kv_bytes == alone.kv_bytes_per_token * 16 * both.num_blocks   # kv_bytes: the target's cache
    text = both.describe()
    assert "draft model: weights 2.50 GB" in text and "32768 B/token, the same blocks" in text
    assert f"KV cache {both.draft.kv_bytes / GB:.2f} GB" in text and "draft" not in alone.describe()


def test_a_runner_with_a_draft_sizes_both_caches_from_one_budget(tmp_path):
    """Tiny models on the CPU: the KV budget (cpu_kv_cache_gb) pays for both caches' bytes per block, the draft's
    caches get the target's block count, and an engine over the runner proposes with that draft."""
    target = write_tiny_llama(tmp_path / "target")
    draft_path = str(write_tiny_llama(tmp_path / "draft", seed=1, num_layers=1))
    cfg = EngineConfig(model=str(target), device="cpu", block_size=4, cpu_kv_cache_gb=0.0005, max_num_seqs=8)
    alone = ModelRunner(cfg)
    spec_cfg = replace(cfg, speculative_method="draft", draft_model=draft_path, num_speculative_tokens=3)
    runner = ModelRunner(spec_cfg)
    budget = int(0.0005 * GB)   # under the cap of 8 full-length sequences (512 blocks)
    per_token, draft_per_token = 2 * 2 * 2 * 16 * 4, 2 * 1 * 2 * 16 * 4   # K and V x layers x kv heads x dim x fp32
    assert alone.plan.kv_bytes_per_token == per_token and alone.num_blocks == budget // (per_token * 4)
    assert runner.num_blocks == budget // ((per_token + draft_per_token) * 4) < alone.num_blocks
    proposer = runner.draft_proposers[draft_path]
    assert [c.data.shape[1] for c in proposer.runner.kv_caches] == [runner.num_blocks]
    assert runner.plan.draft == replace(proposer.runner.plan, num_blocks=runner.num_blocks)
    assert runner.plan.draft.weights_bytes == memory_plan.weights_bytes(proposer.runner.model) > 0
    assert "draft model" in runner.plan.describe()

    engine = Engine(runner.config, UniProcExecutor(runner.config, runner))
    assert engine.draft is proposer
    plain = Engine(alone.config, UniProcExecutor(alone.config, alone))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 5, 6, 7], [9, 10, 11]]
    assert engine.generate(prompts, params) == plain.generate(prompts, params)
    assert engine.spec_stats.num_drafts > 0 and engine.kv.num_used_blocks == 0
