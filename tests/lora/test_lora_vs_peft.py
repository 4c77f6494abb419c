"""The engine with LoRA against transformers + peft on a tiny random Llama (fp32, CPU): one mixed batch (base model,
adapter A, adapter B, A again) run together step by step; each request's logits equal those of the reference with
its own adapter applied (none for the base request), and its greedy tokens are identical."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine_svc.core.request import FinishReason, SamplingParams
from tests.engine.family_checks import make_engine
from tests.lora.peft_fixtures import hf_with_adapter

PROMPTS = [[5, 17, 99, 3, 250, 42, 7, 8, 9], [1, 2], [300, 301, 302, 303, 304, 305], [40, 41, 42, 43]]
ADAPTERS = [None, "a", "b", "a"]
STEPS = 10


def lora_engine(base, adapter_a, adapter_b, **kw):
    engine = make_engine(base, enable_lora=True, max_loras=2, max_lora_rank=16, **kw)
    engine.runner.lora.load("a", str(adapter_a))
    engine.runner.lora.load("b", str(adapter_b))
    return engine


def with_adapters(engine, adapter_of: dict[str, str | None]):
    """Stands in for the request plumbing (another branch): scheduled requests carry their adapter."""
    schedule = engine.scheduler.schedule

    def scheduled_with_adapters():
        out = schedule()
        out.scheduled = [replace(s, adapter=adapter_of[s.request.request_id]) for s in out.scheduled]
        return out
    engine.scheduler.schedule = scheduled_with_adapters
    return engine


def run_mixed(engine):
    """Greedy steps of the mixed batch; returns ({request: [(sequence so far, logits)]}, {request: output ids})."""
    greedy = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    ids = [f"r{i}" for i in range(len(PROMPTS))]
    with_adapters(engine, dict(zip(ids, ADAPTERS)))
    for rid, p in zip(ids, PROMPTS):
        engine.add_request(rid, p, greedy)
    seqs = {rid: list(p) for rid, p in zip(ids, PROMPTS)}
    seen = {rid: [] for rid in ids}
    first = True
    while engine.has_work():
        out = engine.scheduler.schedule()
        if first:   # the whole mix runs in one step (and every decode step after it)
            assert sorted(s.adapter or "" for s in out.scheduled) == sorted(a or "" for a in ADAPTERS)
            first = False
        # A copy: a replayed CUDA graph returns its static output buffer, which the next replay overwrites.
        logits = engine.runner.forward_logits(out).clone()
        sampling = [s for s in out.scheduled if s.samples]
        for row, s in enumerate(sampling):
            seen[s.request.request_id].append((list(seqs[s.request.request_id]), logits[row]))
        sampled = logits.argmax(-1).tolist()
        for s, tok in zip(sampling, sampled):
            seqs[s.request.request_id].append(tok)
        engine.scheduler.update(out, sampled)
    return seen, {rid: seqs[rid][len(p):] for rid, p in zip(ids, PROMPTS)}


@pytest.fixture(scope="module")
def references(tiny_llama, adapter_a, adapter_b):
    return {None: hf_with_adapter(tiny_llama, None), "a": hf_with_adapter(tiny_llama, adapter_a),
            "b": hf_with_adapter(tiny_llama, adapter_b)}


def assert_matches_references(seen, outputs, references, tol=1e-4):
    with torch.no_grad():
        for i, adapter in enumerate(ADAPTERS):
            ref = references[adapter]
            steps = seen[f"r{i}"]
            assert len(steps) == STEPS
            for seq, logits in steps:
                expected = ref(torch.tensor([seq])).logits[0, -1].float()
                torch.testing.assert_close(logits.cpu(), expected, rtol=tol, atol=tol)
            ids = list(PROMPTS[i])
            for _ in range(STEPS):
                ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
            assert outputs[f"r{i}"] == ids[len(PROMPTS[i]):]


def test_adapters_change_the_reference(references):
    """Guards the test itself: each adapter moves the logits well beyond the tolerance."""
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        base = references[None](x).logits
        for name in ("a", "b"):
            assert (references[name](x).logits - base).abs().max() > 0.1


def test_mixed_batch_matches_transformers_peft(tiny_llama, adapter_a, adapter_b, references):
    engine = lora_engine(tiny_llama, adapter_a, adapter_b)
    seen, outputs = run_mixed(engine)
    assert_matches_references(seen, outputs, references)
    assert engine.kv.num_used_blocks == 0


def test_mixed_batch_through_triton_lora_kernels(tiny_llama, adapter_a, adapter_b, references):
    """The same batch with the LoRA layers on the Triton kernels (interpreted on the CPU), paged decode graphs'
    padded buffers included (run eagerly)."""
    from tests.engine.family_checks import triton_unavailable
    if (why := triton_unavailable()) is not None:
        pytest.skip(why)
    if torch.cuda.is_available():
        pytest.skip("the interpreter's test (CPU tensors); on a GPU the compiled kernels are tested below")
    engine = lora_engine(tiny_llama, adapter_a, adapter_b)
    engine.runner.lora.batch.use_kernel = True
    engine.runner.enable_step_graphs(capture=False)
    seen, outputs = run_mixed(engine)
    assert_matches_references(seen, outputs, references)


@pytest.mark.gpu
def test_mixed_batch_on_gpu_with_cuda_graphs(tiny_llama, adapter_a, adapter_b, references):
    """Compiled kernels, decode replayed from CUDA graphs (captured before any adapter was loaded), fp32."""
    # The test drives schedule/forward/update itself, which is the synchronous step: no async scheduling.
    engine = lora_engine(tiny_llama, adapter_a, adapter_b, device="cuda", attention_backend="triton",
                         async_scheduling=False)
    assert engine.runner.graphs is not None and engine.runner.lora.batch.use_kernel
    seen, outputs = run_mixed(engine)
    assert_matches_references(seen, outputs, references, tol=1e-3)


def test_lora_enabled_without_adapters_is_the_base_model(tiny_llama, references):
    engine = make_engine(tiny_llama, enable_lora=True, max_loras=2, max_lora_rank=16)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    plain = make_engine(tiny_llama).generate(PROMPTS, params)
    assert engine.generate(PROMPTS, params) == plain


def test_adapter_without_enable_lora_is_refused(tiny_llama):
    engine = with_adapters(make_engine(tiny_llama), {"r0": "a"})
    engine.add_request("r0", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=2))
    (out,) = engine.step()   # the request fails alone; the engine goes on
    assert out.request_id == "r0" and out.finish_reason is FinishReason.FAILED and out.last
    assert "LoRA is not enabled (--enable-lora)" in out.error
    assert engine.kv.num_used_blocks == 0 and not engine.has_work()
