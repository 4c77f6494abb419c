"""SmolLM2 through the whole stack (gateway -> tokenizer -> engine -> tokenizer -> gateway) against transformers'
greedy output on the same GGUF."""
from __future__ import annotations

import pytest

from protos.tandem.v1 import generation_pb2 as api
from tests.e2e.conftest import hf_greedy

MAX_TOKENS = 32
PLAIN = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
NON_ASCII = ["日本の首都は", "Ünïcödé façade: le garçon a mangé"]


def stream(api_stub, request: api.GenerateRequest):
    chunks = list(api_stub.GenerateStream(request, timeout=120))
    ids = [t for c in chunks for t in c.token_ids]
    text = "".join(c.text for c in chunks)
    return chunks, ids, text


def greedy_request(**input_) -> api.GenerateRequest:
    return api.GenerateRequest(params=api.GenerationParams(max_tokens=MAX_TOKENS, temperature=0.0), **input_)


@pytest.mark.parametrize("prompt", PLAIN + NON_ASCII)
def test_prompt_matches_transformers(api_stub, hf_reference, prompt):
    tok, _ = hf_reference
    prompt_ids = tok(prompt)["input_ids"]
    expected = hf_greedy(hf_reference, prompt_ids, MAX_TOKENS)
    chunks, ids, text = stream(api_stub, greedy_request(prompt=prompt))
    assert len(ids) >= 24 or ids[-1] == 2
    assert ids == expected
    assert text == tok.decode(expected, skip_special_tokens=True)
    last = chunks[-1]
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert last.usage.completion_tokens == len(ids)
    if ids[-1] == 2:
        assert last.finish_reason == api.FINISH_REASON_STOP and last.stop_token_id == 2
    else:
        assert last.finish_reason == api.FINISH_REASON_LENGTH
    assert all(not c.finish_reason for c in chunks[:-1])


def test_chat_matches_transformers(api_stub, hf_reference):
    tok, _ = hf_reference
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = hf_greedy(hf_reference, list(prompt_ids), MAX_TOKENS)
    chat = api.Chat(messages=[api.ChatMessage(role=m["role"], content=m["content"]) for m in messages])
    chunks, ids, text = stream(api_stub, greedy_request(chat=chat))
    assert ids == expected
    assert text == tok.decode(expected, skip_special_tokens=True)
    assert chunks[-1].usage.prompt_tokens == len(prompt_ids)


def test_unary_generate_equals_stream(api_stub):
    req = greedy_request(prompt="Once upon a time")
    _, ids, text = stream(api_stub, req)
    resp = api_stub.Generate(req, timeout=120)
    assert list(resp.token_ids) == ids and resp.text == text
    assert resp.usage.completion_tokens == len(ids)


def test_stop_string_never_leaks(api_stub, hf_reference):
    tok, _ = hf_reference
    full_ids = stream(api_stub, greedy_request(prompt="def fibonacci(n):"))[1]
    full_text = tok.decode(full_ids, skip_special_tokens=True)
    stop = "return"
    assert stop in full_text
    req = greedy_request(prompt="def fibonacci(n):")
    req.params.stop.append(stop)
    chunks, ids, text = stream(api_stub, req)
    assert text == full_text[:full_text.index(stop)]
    assert chunks[-1].finish_reason == api.FINISH_REASON_STOP and chunks[-1].stop_string == stop
    assert ids == full_ids[:len(ids)] and len(ids) < len(full_ids)
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_max_tokens_gives_length(api_stub):
    req = api.GenerateRequest(prompt="Once upon a time", params=api.GenerationParams(max_tokens=3, temperature=0))
    chunks, ids, _ = stream(api_stub, req)
    assert len(ids) == 3 and chunks[-1].finish_reason == api.FINISH_REASON_LENGTH


def test_seeded_sampling_is_reproducible(api_stub):
    def sample(seed):
        req = api.GenerateRequest(prompt="Once upon a time", params=api.GenerationParams(
            max_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=seed))
        return stream(api_stub, req)[1]

    a, b, c = sample(1234), sample(1234), sample(99)
    assert a == b
    assert a != c


def test_model_info(api_stub):
    info = api_stub.GetModelInfo(api.GetModelInfoRequest(), timeout=10)
    assert info.max_context == 8192 and info.vocab_size == 49152 and list(info.eos_token_ids) == [2]
