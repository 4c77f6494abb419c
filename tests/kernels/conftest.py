"""Kernel tests run the Triton kernels for real on a GPU, and under the Triton interpreter on CPU tensors otherwise.

Without CUDA, engine_svc.kernels switches the Triton interpreter on when first imported, which must happen before
anything imports triton (torch may, lazily, while running a model): importing it here, at collection, does that
before any test runs, and fails collection with a clear message if triton came first.
test_interpreter_in_effect_without_cuda checks that it took.
"""
from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:   # not importing triton: that must happen after the switch
    collect_ignore_glob = ["test_*.py"]
else:
    importlib.import_module("engine_svc.kernels")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny random Llama (HF directory) for the engine-level tests."""
    from tests.engine.tiny_models import write_tiny_llama
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), seed=7)


@pytest.fixture
def device() -> torch.device:
    """Where the fp32 equivalence tests run: the GPU when there is one (compiled kernels), else the CPU
    (interpreted kernels)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
