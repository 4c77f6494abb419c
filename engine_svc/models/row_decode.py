"""Batch-1 decode of a Llama-shaped decoder layer on the CPU in two compiled calls and the attention between them,
instead of about 80 eager ops (each costs a few µs of dispatch on this machine type, more than the arithmetic of
a 576-wide row): before attention, residual add, RMSNorm, qkv GEMV and RoPE; after it, o GEMV, residual add,
RMSNorm, gate_up GEMV, SwiGLU and down GEMV. Each is one inductor kernel call (engine_svc.quant.compiled_kernels);
the KV write and paged attention run eagerly on the layer's backend.

It serves layers whose linears are all GemvLinear (engine_svc.loader.gguf_gemv_serving) and whose q / k have no
per-head norms. The arithmetic is the eager layer's, in float32, rounded in another order (inductor's fused
reductions and the GEMVs' block sums).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from engine_svc.attention import AttentionMetadata, KVCache
from engine_svc.models.layers import rms_norm, rotate
from engine_svc.quant.compiled_kernels import Kernel, compile_kernel
from engine_svc.quant.gemv_linear import GemvLinear
from engine_svc.quant.gguf_gemv import q4_gemv


def _gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
          bias: torch.Tensor) -> torch.Tensor:
    return q4_gemv(x.reshape(-1), codes, scales, offsets).view(1, -1) + bias


def _before_attention(heads: tuple[int, int, int], eps: float, x: torch.Tensor, residual: torch.Tensor,
                      norm: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                      bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """-> q [1, heads, d], k and v [1, kv_heads, d], the residual stream [1, hidden]."""
    num_heads, num_kv_heads, head_dim = heads
    residual = x + residual
    qkv = _gemv(rms_norm(residual, norm, eps), codes, scales, offsets, bias)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = rotate(q.view(1, num_heads, head_dim), cos, sin)
    k = rotate(k.view(1, num_kv_heads, head_dim), cos, sin)
    return q, k, v.reshape(1, num_kv_heads, head_dim), residual


def _after_attention(eps: float, o: torch.Tensor, residual: torch.Tensor, o_blocks: tuple, norm: torch.Tensor,
                     gate_up_blocks: tuple, down_blocks: tuple):
    """-> the MLP's output and the residual stream, each [1, hidden]."""
    residual = _gemv(o, *o_blocks) + residual
    gate, up = _gemv(rms_norm(residual, norm, eps), *gate_up_blocks).chunk(2, dim=-1)
    return _gemv(F.silu(gate) * up, *down_blocks), residual


def _flat_after(eps: float, o, residual, norm, *blocks):
    return _after_attention(eps, o, residual, blocks[0:4], norm, blocks[4:8], blocks[8:12])


def row_decode_supported(layer: torch.nn.Module) -> bool:
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    return (all(isinstance(m, GemvLinear) and m.kind == "q4" for m in linears) and not attn.qk_norm
            and not attn.rope.fused and attn.backend.name == "torch")


class RowDecodeLayer:
    """Runs one LlamaDecoderLayer on a single token: __call__ takes and returns what the layer's forward does."""

    def __init__(self, layer: torch.nn.Module) -> None:
        if not row_decode_supported(layer):
            raise ValueError("row decode needs a torch-backend layer of q4 GemvLinear linears without q/k norms")
        self.layer = layer
        attn, mlp = layer.self_attn, layer.mlp
        hidden = layer.input_layernorm.weight.shape[0]
        self._zeros = torch.zeros(1, hidden)
        # The kernels' tensors after the activations, fixed for the layer's life (the loaded weights).
        self._before_args = (layer.input_layernorm.weight, *_gemv_args(attn.qkv_proj))
        self._after_args = (layer.post_attention_layernorm.weight, *_gemv_args(attn.o_proj),
                            *_gemv_args(mlp.gate_up_proj), *_gemv_args(mlp.down_proj))
        heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
        row, rope_row = partial(torch.zeros, 1, hidden), partial(torch.zeros, 1, 1, attn.head_dim)
        eps_in, eps_post = layer.input_layernorm.eps, layer.post_attention_layernorm.eps
        self.before = compile_kernel(partial(_before_attention, heads, eps_in),
                                     (row(), row(), *self._before_args, rope_row(), rope_row()),
                                     key=("llama-row-before", heads, eps_in))
        self.after = compile_kernel(partial(_flat_after, eps_post),
                                    (torch.zeros(1, attn.q_size), row(), *self._after_args),
                                    key=("llama-row-after", eps_post))

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, kv_cache: KVCache,
                 meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.layer.self_attn
        cos, sin = attn.rope.cos[positions][:, None, :], attn.rope.sin[positions][:, None, :]
        # The first layer's residual stream is its input: adding zeros leaves it as it is.
        q, k, v, residual = self.before(x, self._zeros if residual is None else residual, *self._before_args,
                                        cos, sin)
        attn.backend.write_kv(k, v, kv_cache.data, meta, kv_scales=kv_cache.scales)
        o = attn.backend.forward(q, kv_cache.data, meta, attn.scale, window=attn.sliding_window,
                                 kv_scales=kv_cache.scales)
        out, residual = self.after(o.reshape(1, -1), residual, *self._after_args)
        return out, residual


def _gemv_args(linear: GemvLinear) -> tuple[torch.Tensor, ...]:
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.weight.shape[0])
    return (*linear.blocks.tensors, bias)
