"""Quantization tests. Some run the Triton kernels (interpreted without CUDA), so engine_svc.kernels is imported at
collection, before anything imports triton (see tests/kernels/conftest.py); GPU-marked tests skip without CUDA."""
from __future__ import annotations

import importlib
import importlib.util

if importlib.util.find_spec("triton") is not None:
    importlib.import_module("engine_svc.kernels")
