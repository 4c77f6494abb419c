"""The CPU's default serving of a Q4 GGUF (engine_svc.loader.gguf_gemv_serving) on tiny files: it applies to the
default dtype only, multiplies the very float32 weights of the exact path, decodes a single token in compiled
calls that compute what the eager layers do, and generates the exact path's greedy tokens."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as T

from engine_svc.attention import AttentionMetadata
from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.loader.gguf_gemv_serving import gguf_gemv_applies
from engine_svc.quant.gemv_linear import GemvLinear
from engine_svc.worker.cpu_threads import set_cpu_threads
from tests.engine.family_checks import PROMPTS, engine_config, make_engine, stepped_logits
from tests.quant.tiny_gguf import write_tiny_gguf

LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def keep_threads():
    """The thread tests set the process's thread count: give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gemv-gguf")
    return {"q4_1": write_tiny_gguf(root / "q4_1.gguf", T.Q4_1, seed=5, head_type=T.Q8_0),
            "q4_0": write_tiny_gguf(root / "q4_0.gguf", T.Q4_0, seed=6, head_type=T.Q4_1),
            "q8_0": write_tiny_gguf(root / "q8_0.gguf", T.Q8_0, seed=7)}


@pytest.fixture(scope="module")
def engines(files):
    return make_engine(files["q4_1"], dtype="auto"), make_engine(files["q4_1"])


def test_applies_to_the_cpu_default_on_q4_linears_only(files):
    base = engine_config(files["q4_1"], dtype="auto")
    assert gguf_gemv_applies(base, Path(base.model), CPU, 1)
    for change in (dict(dtype="float32"), dict(quantization="int4"), dict(enable_lora=True),
                   dict(load_format="dummy"), dict(cpu_offload_gb=0.5)):
        assert not gguf_gemv_applies(dataclasses.replace(base, **change), Path(base.model), CPU, 1), change
    assert not gguf_gemv_applies(base, Path(base.model), CPU, 2)
    assert not gguf_gemv_applies(base, Path(base.model), torch.device("cuda"), 1)
    q8 = engine_config(files["q8_0"], dtype="auto")
    assert not gguf_gemv_applies(q8, Path(q8.model), CPU, 1)   # Q8_0 linears do not load as int4 exactly


def test_gemv_linears_hold_the_float32_paths_weights(engines):
    fast, exact = engines
    assert fast.runner.model.model.row_decode is not None and exact.runner.model.model.row_decode is None
    for ours, ref in zip(fast.runner.model.model.layers, exact.runner.model.model.layers, strict=True):
        for name in LINEARS:
            module = ours.get_submodule(name)
            assert isinstance(module, GemvLinear) and module.kind == "q4" and module.kernel is not None
            assert torch.equal(module.weight, ref.get_submodule(name).weight)
            assert torch.equal(module.blocks.dequantized(), module.weight)
    head = fast.runner.model.lm_head
    assert isinstance(head, GemvLinear) and head.kind == "q8"
    assert torch.equal(head.weight, exact.runner.model.lm_head.weight)
    assert torch.equal(head.blocks.dequantized(), head.weight)


def test_lm_head_in_q4_blocks(files):
    engine = make_engine(files["q4_0"], dtype="auto")
    head = engine.runner.model.lm_head
    assert isinstance(head, GemvLinear) and head.kind == "q4"
    assert torch.equal(head.blocks.dequantized(), head.weight)


def test_the_default_generates_the_float32_paths_tokens(engines):
    fast, exact = engines
    assert fast.generate(PROMPTS, GREEDY) == exact.generate(PROMPTS, GREEDY)   # batched: F.linear on both
    for prompt in PROMPTS:   # alone: one row a step, the compiled calls
        assert fast.generate([prompt], GREEDY) == exact.generate([prompt], GREEDY)
    for a, b in zip(stepped_logits(fast, PROMPTS[:1], 6), stepped_logits(exact, PROMPTS[:1], 6), strict=True):
        assert a[0] == b[0]
        torch.testing.assert_close(a[1], b[1], rtol=1e-4, atol=1e-4)


def _one_token_step(position: int, block: int) -> AttentionMetadata:
    slot = block * 4 + position % 4
    return AttentionMetadata(
        slot_mapping=torch.tensor([slot]), block_tables=torch.tensor([[7, block]], dtype=torch.int32),
        seq_lens=torch.tensor([position + 1], dtype=torch.int32), query_start=torch.tensor([0, 1], dtype=torch.int32),
        query_lens_cpu=[1], seq_lens_cpu=[position + 1], block_size=4, max_seq_len=position + 1)


def test_row_decode_computes_what_the_eager_model_does(engines):
    fast, _ = engines
    model, caches = fast.runner.model.model, fast.runner.kv_caches
    ids, positions, meta = torch.tensor([17]), torch.tensor([5]), _one_token_step(5, 9)
    hidden, written = [], []
    for row in (model.row_decode, None):
        for i, cache in enumerate(caches):
            cache.data.copy_(torch.randn(cache.data.shape, generator=torch.Generator().manual_seed(i)))
        saved, model.row_decode = model.row_decode, row
        with torch.inference_mode():
            hidden.append(model(ids, positions, caches, meta))
        model.row_decode = saved
        written.append(torch.stack([cache.data[:, 9] for cache in caches]))
    assert hidden[0].shape == (1, 64)
    torch.testing.assert_close(hidden[0], hidden[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(written[0], written[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, world, asked, expected", [
    ("cpu", 1, None, 2), ("cpu", 1, 3, 3), ("cpu", 2, 3, 2), ("cuda", 1, 3, 2)])
def test_cpu_threads(device, world, asked, expected):
    torch.set_num_threads(2)
    set_cpu_threads(EngineConfig(model="m", cpu_threads=asked, tensor_parallel_size=world), torch.device(device))
    assert torch.get_num_threads() == expected


def test_single_token_steps_run_on_one_thread(engines, monkeypatch):
    fast, exact = engines
    seen = []
    backend = fast.runner.model.model.layers[0].self_attn.backend
    forward = type(backend).forward
    monkeypatch.setattr(type(backend), "forward", lambda *a, **kw: seen.append(torch.get_num_threads())
                        or forward(*a, **kw))
    torch.set_num_threads(2)
    fast.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    # the prompt's step (11 rows) on the process's two threads, each single-token step's layers on one
    assert seen == [2, 2] + [1, 1] * 2 and torch.get_num_threads() == 2


def test_cpu_threads_must_be_positive():
    with pytest.raises(ValueError, match="cpu_threads must be >= 1"):
        EngineConfig(model="m", cpu_threads=0)
