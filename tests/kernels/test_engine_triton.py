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


def generate(path, backend: str, device: str, dtype: str = "float32", eager: bool = True,
             kv_cache_dtype: str = "auto") -> tuple[list[list[int]], list[list]]:
    """Returns the outputs and, per eager attention call, the (q_len, seq_len) of each sequence in the batch."""
    # A 6-token step budget splits the longer prompts into chunks that attend over their own cached prefix.
    engine = Engine(EngineConfig(model=str(path), device=device, dtype=dtype, attention_backend=backend,
                                 block_size=4, num_kv_blocks=64, max_num_seqs=8, max_num_batched_tokens=6,
                                 enforce_eager=eager, kv_cache_dtype=kv_cache_dtype))
    attention = engine.runner.backend
    batches = []
    forward = attention.forward

    def recording_forward(q, kv_cache, meta, scale, **kwargs):
        batches.append(list(zip(meta.query_lens_cpu, meta.seq_lens_cpu)))
        return forward(q, kv_cache, meta, scale, **kwargs)

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


def test_decode_graph_buckets_equal_eager(checkpoint):
    """Decode through the CUDA-graph path (bucketed, padded persistent inputs, max_model_len-wide tables). On the
    CPU the graphs are not captured but the same padded buffers run eagerly: same tokens as the eager path, and
    padding rows leave the KV cache untouched."""
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def run(graphs: bool):
        engine = Engine(EngineConfig(model=str(checkpoint), device=device, dtype="float32", attention_backend="triton",
                                     block_size=4, num_kv_blocks=64, max_num_seqs=6, max_num_batched_tokens=32,
                                     max_model_len=64, enforce_eager=True))
        runner = engine.runner
        buckets = []
        if graphs:
            runner.enable_step_graphs(capture=torch.cuda.is_available())
            run_shape = runner.graphs.run
            runner.graphs.run = lambda shape: (buckets.append(shape.batch), run_shape(shape))[1]
        outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        return outs, [c.data.clone() for c in runner.kv_caches], buckets, runner.graphs

    eager_outs, eager_kv, _, _ = run(False)
    outs, kv, buckets, graphs = run(True)
    assert [s.batch for s in graphs.shapes] == [1, 2, 4, 6]
    assert outs == eager_outs
    assert 4 in buckets                                 # 3 decoding sequences padded to the bucket of 4
    for a, b in zip(kv, eager_kv):
        # Row-count-dependent GEMM rounding aside, the same values (a padding write would differ by far more), and
        # the blocks no request owned are still all zeros.
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        untouched = b.flatten(2).abs().sum(dim=(0, 2)) == 0
        assert untouched.sum() > 0 and torch.equal(a[:, untouched], b[:, untouched])
