"""Verify steps of speculative decoding through the CUDA-graph path (every row padded to K + 1 tokens, the batch to
a bucket: engine_svc.worker.graph_layout) give the logits of the eager, unpadded step, the same greedy tokens, the
same KV cache and prefix cache, and leave every block no request owned untouched. On the CPU the graphs are not
captured but the same padded buffers run eagerly (Triton interpreted); on a GPU they are captured and replayed."""
from __future__ import annotations

import pytest
import torch

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from engine_svc.worker.graph_layout import GraphShape

# n-gram lookup proposes from the repeats; the prompts' lengths differ, so rows propose different counts.
PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [20, 21, 20, 21, 20, 21, 20], [40, 41, 42, 43, 40, 41]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
K = 3


def make_engine(checkpoint, device: torch.device, speculate: bool = True, enforce_eager: bool = True) -> Engine:
    return Engine(EngineConfig(model=str(checkpoint), device=device.type, dtype="float32", attention_backend="triton",
                               block_size=4, num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=32,
                               max_model_len=64, enforce_eager=enforce_eager,
                               speculative_method="ngram" if speculate else None, num_speculative_tokens=K))


def compare_with_eager(runner) -> list[tuple[GraphShape, list[int], torch.Tensor, torch.Tensor]]:
    """Makes every verify step the runner runs in a graph shape run a second time eagerly (unpadded); records
    (shape, each row's proposal count, graph logits, eager logits)."""
    seen = []
    forward = runner._forward

    def both(out):
        shape = runner._graph_shape(out)
        logits, prompt = forward(out)
        if shape is not None and shape.width > 1:
            graphs, runner.graphs = runner.graphs, None
            eager, _ = forward(out)   # rewrites the same slots with the same K/V
            runner.graphs = graphs
            seen.append((shape, [len(s.spec_token_ids) for s in out.scheduled], logits.clone(), eager))
        return logits, prompt

    runner._forward = both
    return seen


def generate(engine: Engine) -> list[list[int]]:
    outs = engine.generate(PROMPTS, PARAMS)
    assert engine.check_integrity() == [] and engine.kv.num_used_blocks == 0
    return outs


def cached_blocks(engine: Engine) -> dict[bytes, torch.Tensor]:
    """The prefix cache's blocks by key: each one's K/V in every layer."""
    return {key: torch.stack([c.data[:, block] for c in engine.runner.kv_caches])
            for key, block in engine.kv.pool._cached.items()}


def test_verify_steps_in_the_padded_layout_equal_the_eager_steps(checkpoint, device):
    plain = make_engine(checkpoint, device, speculate=False)
    expected = generate(plain)
    eager = make_engine(checkpoint, device)
    assert generate(eager) == expected
    padded = make_engine(checkpoint, device)
    padded.runner.enable_step_graphs(capture=device.type == "cuda")
    assert {s.width for s in padded.runner.graphs.shapes} == {1, K + 1}
    seen = compare_with_eager(padded.runner)
    assert generate(padded) == expected
    assert padded.spec_stats.num_accepted_tokens > 0
    # Padding happened: rows with fewer than K proposals, or padding rows past the batch.
    assert any(len(ks) < shape.batch or min(ks) < K for shape, ks, *_ in seen)
    for shape, ks, graph_logits, eager_logits in seen:
        assert graph_logits.shape == eager_logits.shape == (sum(k + 1 for k in ks), graph_logits.shape[1])
        torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-4, atol=1e-4)
    if device.type == "cuda":   # replays, not eager fallbacks
        assert all(shape in padded.runner.graphs._graphs for shape, *_ in seen)
    # No padded or rejected position reached the cache: the KV of every block equals the eager run's (GEMM rounding
    # aside), the blocks no request owned are still zeros, and the prefix cache holds the same blocks with the same
    # K/V as a run without speculation (whose block ids differ).
    for a, b in zip(padded.runner.kv_caches, eager.runner.kv_caches):
        torch.testing.assert_close(a.data, b.data, rtol=1e-4, atol=1e-5)
        untouched = b.data.flatten(2).abs().sum(dim=(0, 2)) == 0
        assert untouched.sum() > 0 and torch.equal(a.data[:, untouched], b.data[:, untouched])
    reference, got = cached_blocks(plain), cached_blocks(padded)
    assert got.keys() == reference.keys() and len(got) > 0
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_captured_verify_graphs_at_start_up_give_the_eager_tokens(checkpoint):
    """The production path: a runner started with speculation captures decode and verify graphs, and replays them."""
    cuda = torch.device("cuda")
    expected = generate(make_engine(checkpoint, cuda))
    engine = make_engine(checkpoint, cuda, enforce_eager=False)
    graphs = engine.runner.graphs
    assert graphs is not None and {s.width for s in graphs._graphs} == {1, K + 1}
    replayed = []
    run = graphs.run
    graphs.run = lambda shape: (replayed.append(shape), run(shape))[1]
    assert generate(engine) == expected
    assert any(shape.width == K + 1 for shape in replayed)
