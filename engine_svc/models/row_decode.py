"""A Llama-shaped model's single-token step on the CPU in one compiled call between attentions, instead of about
80 eager ops a layer (each costs a few µs of dispatch on this machine type, more than the arithmetic of a 576-wide
row). The call between layer i's attention and layer i + 1's takes layer i's o GEMV, residual add, RMSNorm,
gate_up GEMV, SwiGLU and down GEMV, then layer i + 1's residual add, RMSNorm, qkv GEMV and RoPE; the first call
starts the first layer, the last one ends the last layer with the final norm. Each is one inductor kernel call
(engine_svc.quant.compiled_kernels), shared by every layer of the same shapes; the KV write and the paged attention
run eagerly on the layers' backend.

It serves a whole model (one pipeline stage) whose decoder linears are all q4 GemvLinear
(engine_svc.loader.gguf_gemv_serving) and whose q / k have no per-head norms. The arithmetic is the eager layers',
in float32, rounded in another order (inductor's fused reductions and the GEMVs' block sums).

Every normalized row is also returned by the graph that makes it: inductor then stores it once, where it would
otherwise recompute the norm inside every output row of the GEMV that reads it (measured: 40% slower).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from engine_svc.attention import AttentionMetadata, KVCache
from engine_svc.models.layers import rms_norm, rotate
from engine_svc.quant.compiled_kernels import compile_kernel, one_thread
from engine_svc.quant.gemv_linear import GemvLinear
from engine_svc.quant.gguf_gemv import q4_gemv

_GEMV_ARGS = 4   # a linear's tensors in the graphs: codes, scales, offsets, bias


def _gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
          bias: torch.Tensor) -> torch.Tensor:
    return q4_gemv(x.reshape(-1), codes, scales, offsets).view(1, -1) + bias


def _start(heads: tuple[int, int, int], eps: float, x: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor,
           *rest: torch.Tensor):
    """A layer's work before attention: -> q [1, heads, d], k and v [1, kv_heads, d], the residual stream, h.
    rest: the qkv linear's tensors, then the position's cos and sin rows."""
    num_heads, num_kv_heads, head_dim = heads
    qkv_args, (cos, sin) = rest[:_GEMV_ARGS], rest[_GEMV_ARGS:]
    residual = x + residual
    h = rms_norm(residual, norm, eps)
    q, k, v = _gemv(h, *qkv_args).split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                                        dim=-1)
    q = rotate(q.view(1, num_heads, head_dim), cos, sin)
    k = rotate(k.view(1, num_kv_heads, head_dim), cos, sin)
    return q, k, v.reshape(1, num_kv_heads, head_dim), residual, h


def _finish(eps: float, o: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor, *linears: torch.Tensor):
    """A layer's work after attention: -> the MLP's output, the residual stream, h. linears: o, gate_up, down's."""
    o_args, gate_up_args, down_args = (linears[i:i + _GEMV_ARGS] for i in range(0, 3 * _GEMV_ARGS, _GEMV_ARGS))
    residual = _gemv(o, *o_args) + residual
    h = rms_norm(residual, norm, eps)
    gate, up = _gemv(h, *gate_up_args).chunk(2, dim=-1)
    return _gemv(F.silu(gate) * up, *down_args), residual, h


_FINISH_ARGS = 1 + 3 * _GEMV_ARGS   # the norm and three linears


def _between(heads: tuple[int, int, int], eps_finish: float, eps_start: float, o: torch.Tensor,
             residual: torch.Tensor, *rest: torch.Tensor):
    """One layer's finish, then the next one's start: -> the start's outputs, then the finish's h."""
    out, residual, h_finish = _finish(eps_finish, o, residual, *rest[:_FINISH_ARGS])
    return (*_start(heads, eps_start, out, residual, *rest[_FINISH_ARGS:]), h_finish)


def _end(eps_finish: float, eps_final: float, o: torch.Tensor, residual: torch.Tensor, *rest: torch.Tensor):
    """The last layer's finish and the final norm: -> the model's hidden row, the finish's h."""
    out, residual, h = _finish(eps_finish, o, residual, *rest[:_FINISH_ARGS])
    return rms_norm(out + residual, rest[_FINISH_ARGS], eps_final), h


def row_decode_supported(model: nn.Module) -> bool:
    """model: a LlamaModel holding every layer, the embedding and the final norm."""
    layers = list(model.layers)
    if model.embed_tokens is None or model.norm is None or (model.start, model.stop) != (0, len(layers)):
        return False
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if (not all(isinstance(m, GemvLinear) and m.kind == "q4" for m in linears) or attn.qk_norm
                or attn.rope.fused or attn.backend.name != "torch"):
            return False
    return True


def _gemv_args(linear: GemvLinear) -> tuple[torch.Tensor, ...]:
    bias = linear.bias if linear.bias is not None else torch.zeros(linear.weight.shape[0])
    return (*linear.blocks.tensors, bias)


class RowDecodeModel:
    """Runs a LlamaModel on a single token: __call__ takes and returns what its forward does."""

    def __init__(self, model: nn.Module) -> None:
        if not row_decode_supported(model):
            raise ValueError("row decode needs a whole model of torch-backend layers with q4 GemvLinear linears "
                             "and no q/k norms")
        self.model = model
        self.layers = list(model.layers)
        # The graphs' tensors after the activations, fixed for the model's life (the loaded weights).
        self._start_args = [(layer.input_layernorm.weight, *_gemv_args(layer.self_attn.qkv_proj))
                            for layer in self.layers]
        self._finish_args = [(layer.post_attention_layernorm.weight, *_gemv_args(layer.self_attn.o_proj),
                              *_gemv_args(layer.mlp.gate_up_proj), *_gemv_args(layer.mlp.down_proj))
                             for layer in self.layers]
        attn = self.layers[0].self_attn
        self._heads = (attn.num_heads, attn.num_kv_heads, attn.head_dim)
        hidden = self.layers[0].input_layernorm.weight.shape[0]
        self._zeros = torch.zeros(1, hidden)
        row, o, rope_row = (partial(torch.zeros, 1, n) for n in (hidden, attn.q_size, 1))
        rope = (rope_row(attn.head_dim), rope_row(attn.head_dim))
        eps_start = [layer.input_layernorm.eps for layer in self.layers]
        eps_finish = [layer.post_attention_layernorm.eps for layer in self.layers]
        self._first = compile_kernel(partial(_start, self._heads, eps_start[0]),
                                     (row(), row(), *self._start_args[0], *rope),
                                     key=("llama-row-start", self._heads, eps_start[0]))
        self._between = [compile_kernel(partial(_between, self._heads, eps_finish[i], eps_start[i + 1]),
                                        (o(), row(), *self._finish_args[i], *self._start_args[i + 1], *rope),
                                        key=("llama-row-between", self._heads, eps_finish[i], eps_start[i + 1]))
                         for i in range(len(self.layers) - 1)]
        self._final_norm = (model.norm.weight,)
        self._end = compile_kernel(partial(_end, eps_finish[-1], model.norm.eps),
                                   (o(), row(), *self._finish_args[-1], *self._final_norm),
                                   key=("llama-row-end", eps_finish[-1], model.norm.eps))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                 meta: AttentionMetadata) -> torch.Tensor:
        with one_thread():   # the attention's ops too (see compiled_kernels)
            return self._step(input_ids, positions, kv_caches, meta)

    def _step(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
              meta: AttentionMetadata) -> torch.Tensor:
        rope = self.layers[0].self_attn.rope
        cos, sin = rope.cos[positions][:, None, :], rope.sin[positions][:, None, :]
        # The first layer's residual stream is its input: adding zeros leaves it as it is.
        q, k, v, residual, _ = self._first(self.model.embed_tokens(input_ids), self._zeros, *self._start_args[0],
                                           cos, sin)
        last = len(self.layers) - 1
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            attn = layer.self_attn
            attn.backend.write_kv(k, v, cache.data, meta, kv_scales=cache.scales)
            o = attn.backend.forward(q, cache.data, meta, attn.scale, window=attn.sliding_window,
                                     kv_scales=cache.scales).reshape(1, -1)
            if i == last:
                return self._end(o, residual, *self._finish_args[i], *self._final_norm)[0]
            q, k, v, residual, *_ = self._between[i](o, residual, *self._finish_args[i], *self._start_args[i + 1],
                                                     cos, sin)
        raise AssertionError("unreachable: a model has at least one layer")
