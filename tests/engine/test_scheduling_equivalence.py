"""Scheduling must never change what is generated: greedy outputs (fp32, CPU) are identical with prefix caching on
and off, with chunked prefill at several chunk sizes and without it, and with forced preemption (a tiny KV cache)
and without it, on a tiny random Llama and on SmolLM2. Each run ends with every KV block unreferenced."""
from __future__ import annotations

import pytest

from engine_svc.config import EngineConfig
from engine_svc.core.request import SamplingParams
from engine_svc.engine import Engine
from tests.engine.tiny_models import write_tiny_llama

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def drive(engine: Engine, arrivals: list[tuple[int, list[int]]], params: SamplingParams) -> list[list[int]]:
    """Adds request i at step arrivals[i][0] (so later ones can hit what earlier ones cached, and join while
    others decode); returns each request's output ids."""
    outputs: list[list[int]] = [[] for _ in arrivals]
    ids = {f"q{engine.num_steps}-{i}": i for i in range(len(arrivals))}
    pending = sorted(ids.items(), key=lambda kv: arrivals[kv[1]][0])
    step = 0
    while pending or engine.has_work():
        while pending and arrivals[pending[0][1]][0] <= step:
            rid, i = pending.pop(0)
            engine.add_request(rid, arrivals[i][1], params)
        for o in engine.step():
            outputs[ids[o.request_id]].extend(o.new_token_ids)
        step += 1
    return outputs


def run_waves(engine: Engine, waves) -> list[list[int]]:
    """waves: callables taking the outputs so far and returning the next wave's arrivals (multi-turn follow-ups
    are built from earlier outputs)."""
    outs: list[list[int]] = []
    for wave in waves:
        outs += drive(engine, wave(outs), GREEDY)
        assert engine.check_integrity() == []
        assert engine.kv.num_used_blocks == 0
    return outs


def tiny_waves():
    system = [(7 * i + 3) % 300 + 10 for i in range(21)]             # a shared "system prompt" of 21 tokens
    long = [(5 * i + 1) % 300 + 10 for i in range(70)]
    first = lambda _: [(0, system + [40, 41, 42]), (0, system + [50]), (1, long), (2, system + [40, 41, 42]),
                       (3, [11, 12, 13]), (5, system + [60, 61, 62, 63, 64, 65, 66, 67])]
    # A follow-up turn: the first conversation, its reply, and a new message.
    second = lambda outs: [(0, system + [40, 41, 42] + outs[0] + [70, 71]), (0, long[:40] + [90])]
    return [first, second]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-sched"), seed=3, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_base(tiny_model) -> Engine:
    """Loaded once; each variant is a fresh engine over the same weights (Engine.with_scheduling)."""
    return Engine(EngineConfig(model=str(tiny_model), device="cpu", dtype="float32", block_size=4, num_kv_blocks=256,
                               max_model_len=256, max_num_batched_tokens=256, enable_prefix_caching=False,
                               enable_chunked_prefill=False))


TINY_VARIANTS = {
    "prefix-caching": dict(enable_prefix_caching=True),
    "chunk-3": dict(enable_chunked_prefill=True, max_num_batched_tokens=3),
    "chunk-7": dict(enable_chunked_prefill=True, max_num_batched_tokens=7),
    "chunk-16": dict(enable_chunked_prefill=True, max_num_batched_tokens=16),
    "preemption": dict(num_kv_blocks=24),
    "all-at-once": dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=7,
                        num_kv_blocks=24),
}


@pytest.fixture(scope="module")
def tiny_reference(tiny_base):
    engine = tiny_base.with_scheduling()
    outs = run_waves(engine, tiny_waves())
    assert engine.scheduler.num_preemptions == 0 and all(len(o) == GREEDY.max_tokens for o in outs)
    return outs


@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_model_outputs_do_not_depend_on_scheduling(tiny_base, tiny_reference, variant):
    engine = tiny_base.with_scheduling(**TINY_VARIANTS[variant])
    outs = run_waves(engine, tiny_waves())
    assert outs == tiny_reference
    kv = engine.kv
    if engine.config.enable_prefix_caching:
        assert kv.prefix_stats.hits >= 2 * 20          # the system prompt and the follow-up turn were reused
    if engine.config.num_kv_blocks == 24:
        assert engine.scheduler.num_preemptions > 0
    assert kv.pool.num_free + kv.pool.num_cached_idle == kv.num_blocks


# --- SmolLM2 --------------------------------------------------------------------------------------------------------

SMOL_TEXTS = [
    "You are a helpful assistant. Answer briefly and precisely.\nQuestion: what is the capital of France?",
    "You are a helpful assistant. Answer briefly and precisely.\nQuestion: name three primary colours.",
    "The history of the printing press begins in the fifteenth century, when",
    "You are a helpful assistant. Answer briefly and precisely.\nQuestion: what is two plus two?",
]


@pytest.fixture(scope="module")
def smol_prompts(smollm2_gguf):
    from tokenizer_svc.loading import load_tokenizer

    tok = load_tokenizer(str(smollm2_gguf))
    return [tok.encode_text(t) for t in SMOL_TEXTS]




def smol_waves(prompts):
    return [lambda _: [(0, prompts[0]), (0, prompts[2]), (2, prompts[1]), (3, prompts[3])],
            lambda outs: [(0, prompts[0] + outs[0] + prompts[3][-6:])]]


def test_smollm2_outputs_do_not_depend_on_scheduling(smollm2_gguf, smol_prompts):
    base = Engine(EngineConfig(model=str(smollm2_gguf), device="cpu", dtype="float32", block_size=16, num_kv_blocks=64,
                               max_model_len=512, max_num_batched_tokens=512, enable_prefix_caching=False,
                               enable_chunked_prefill=False))
    reference = run_waves(base, smol_waves(smol_prompts))
    variants = {
        "caching + chunk 16": dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=16),
        "chunk 40": dict(enable_chunked_prefill=True, max_num_batched_tokens=40),
        "preemption + caching": dict(num_kv_blocks=6, enable_prefix_caching=True),
    }
    for name, kw in variants.items():
        engine = base.with_scheduling(**kw)
        assert run_waves(engine, smol_waves(smol_prompts)) == reference, name
        if kw.get("enable_prefix_caching"):
            assert engine.kv.prefix_stats.hits >= 16, name
        if kw.get("num_kv_blocks") == 6:
            assert engine.scheduler.num_preemptions > 0, name
