"""fp8 W8A8 (see engine_svc.quant): e4m3 values with one float32 scale per row, v[r, c] = q[r, c] * scale[r];
weights get one scale per output channel at load time, activations one per token at run time, each mapping the row's
absolute maximum onto 448 (the arithmetic: engine_svc.kernels.fp8_numerics.quantize_fp8_rows). This module says
which devices run it."""
from __future__ import annotations

import torch

MIN_CAPABILITY = (8, 9)            # torch._scaled_mm's fp8 tensor cores: Ada (8.9) and Hopper (9.0) on


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why the fp8 path cannot run on this device, or None if it can."""
    if device.type != "cuda":
        return f"the device is {device}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{device} ({name}) has compute capability {capability[0]}.{capability[1]}"
    return None


def require_fp8_support(device: torch.device) -> None:
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        raise ValueError(f"fp8 quantization (W8A8 on torch._scaled_mm) needs a CUDA device with compute capability "
                         f">= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada or Hopper), but {reason}")
