"""A tiny random Llama and two PEFT adapters of different ranks and targets (one of them all seven), shared by the
LoRA tests."""
from __future__ import annotations

import importlib
import importlib.util

import pytest

if importlib.util.find_spec("triton") is not None:
    # Switches the Triton interpreter on without CUDA; must come before peft/transformers import triton.
    importlib.import_module("engine_svc.kernels")

from tests.engine.tiny_models import write_tiny_llama
from tests.lora.peft_fixtures import ALL_TARGETS, write_peft_adapter

if importlib.util.find_spec("peft") is None:   # the adapters are made with peft (the `test` extra)
    collect_ignore_glob = ["test_lora_vs_peft.py", "test_manager.py"]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("lora-base"), seed=11)


@pytest.fixture(scope="session")
def adapter_a(tiny_llama, tmp_path_factory):
    """Rank 4, attention only, rsLoRA scaling."""
    return write_peft_adapter(tiny_llama, tmp_path_factory.mktemp("adapter-a"), r=4, alpha=8,
                              targets=["q_proj", "v_proj", "o_proj"], seed=1, use_rslora=True)


@pytest.fixture(scope="session")
def adapter_b(tiny_llama, tmp_path_factory):
    """Rank 8, all seven projections."""
    return write_peft_adapter(tiny_llama, tmp_path_factory.mktemp("adapter-b"), r=8, alpha=16, targets=ALL_TARGETS,
                              seed=2)
