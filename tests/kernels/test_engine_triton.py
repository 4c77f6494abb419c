"""Greedy generation with attention_backend="triton" (Triton attention, KV writes, RMSNorm, RoPE, SwiGLU) equals
the torch backend's on a tiny random Llama in fp32, through chunked prefill, a prefix-cache hit and paged decode.
On CPU the kernels run under the Triton interpreter."""
from __future__ import annotations

import torch

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine

PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8, 9, 11, 13], [1, 2], [300, 301, 302, 303, 304, 305, 306, 307, 308]]
# Shares its first 8 tokens (two 4-token blocks) with PROMPTS[0]: run after it, only its last 2 tokens are computed.
PREFIX_HIT = [5, 17, 99, 3, 250, 42, 7, 8, 60, 61]


def generate(path, backend: str, device: str, dtype: str = "float32") -> tuple[list[list[int]], list[list]]:
    """Returns the outputs and, per attention call, the (q_len, seq_len) of each sequence in the batch."""
    # A 6-token step budget splits the longer prompts into chunks that attend over their own cached prefix.
    engine = Engine(EngineConfig(model=str(path), device=device, dtype=dtype, attention_backend=backend,
                                 block_size=4, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=6))
    attention = engine.runner.backend
    batches = []
    forward = attention.forward

    def recording_forward(q, kv_cache, meta, scale):
        batches.append(list(zip(meta.query_lens_cpu, meta.seq_lens_cpu)))
        return forward(q, kv_cache, meta, scale)

    attention.forward = recording_forward   # the model's layers call this instance's forward
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outs = engine.generate(PROMPTS, params)
    outs += engine.generate([PREFIX_HIT], params)
    return outs, batches


def test_greedy_triton_equals_torch(checkpoint):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected, _ = generate(checkpoint, "torch", device)
    outs, batches = generate(checkpoint, "triton", device)
    assert outs == expected
    assert all(len(o) == 8 for o in expected)
    pairs = {p for b in batches for p in b}
    assert any(q > 1 and s > q for q, s in pairs)       # a prefill chunk over a cached prefix
    assert (2, len(PREFIX_HIT)) in pairs                # the prefix hit: 8 cached tokens, 2 computed
    assert any(all(q == 1 for q, _ in b) for b in batches)   # decode-only batches (the split-KV kernel)
