"""fp8 W8A8 (see engine_svc.quant): e4m3 values with one float32 scale per row, v[r, c] = q[r, c] * scale[r].
Weights get one scale per output channel at load time; activations one per token at run time. The scale maps the
row's absolute maximum onto E4M3_MAX, the largest finite e4m3 value."""
from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
MIN_CAPABILITY = (8, 9)            # torch._scaled_mm's fp8 tensor cores: Ada (8.9) and Hopper (9.0) on
SCALE_FLOOR = 1e-12                      # floor of a scale: an all-zero row quantizes to zeros, not NaN


def quantize_fp8_rows(x: torch.Tensor, row_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float -> (e4m3 [R, C], float32 scale [R, 1]); round to nearest even, |x / scale| <= 448.
    row_absmax [R]: each row's absolute maximum when x holds only part of the rows (see quantize_int8)."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True) if row_absmax is None else row_absmax.float().view(-1, 1)
    scale = (absmax / E4M3_MAX).clamp_(min=SCALE_FLOOR)
    return (xf / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def quantize_fp8(w: torch.Tensor, row_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [N, K] -> (e4m3 [N, K], float32 scale [N]), one scale per output channel."""
    q, scale = quantize_fp8_rows(w, row_absmax)
    return q, scale.squeeze(-1)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_fp8 (scale [N]) or quantize_fp8_rows (scale [R, 1])."""
    s = scale.float()
    return (q.float() * (s if s.dim() == 2 else s[:, None])).to(dtype)


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
