"""The extra sampling parameters travel from the public API to the engine's sampler and change what is generated
the way they should."""
from __future__ import annotations

from protos.tandem.v1 import generation_pb2 as api

P = api.GenerationParams


def generate(api_stub, max_tokens: int = 6, **params) -> api.GenerateResponse:
    return api_stub.Generate(api.GenerateRequest(prompt="The capital of France is",
                                                 params=P(max_tokens=max_tokens, temperature=0, **params)),
                             timeout=120)


def test_allowed_token_ids_and_logit_bias_steer_greedy_output(api_stub):
    plain = generate(api_stub)
    allowed = [plain.token_ids[0] + 1, 1000, 2000]
    only = generate(api_stub, allowed_token_ids=allowed)
    assert set(only.token_ids) <= set(allowed)
    forced = generate(api_stub, logit_bias={1234: 100.0})
    assert forced.token_ids == [1234] * 6
    banned = generate(api_stub, logit_bias={t: -100.0 for t in set(plain.token_ids)})
    assert not set(banned.token_ids) & set(plain.token_ids)


def test_min_tokens_holds_off_eos_and_penalties_change_repetition(api_stub):
    eos_first = generate(api_stub, logit_bias={2: 100.0})          # 2 is <|im_end|>, SmolLM2's EOS
    assert eos_first.token_ids == [2] and eos_first.finish_reason == api.FINISH_REASON_STOP
    held = generate(api_stub, logit_bias={2: 100.0}, min_tokens=3)
    assert len(held.token_ids) == 4 and held.token_ids[-1] == 2 and 2 not in held.token_ids[:3]


def test_repetition_penalty_through_the_stack_matches_transformers(api_stub, hf_reference):
    import torch

    tok, model = hf_reference
    prompt = "Repeat after me: the cat sat on the mat, the cat sat on the mat,"
    prompt_ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                             pad_token_id=2, repetition_penalty=1.3)[0, len(prompt_ids):].tolist()
    resp = api_stub.Generate(api.GenerateRequest(prompt=prompt, params=P(max_tokens=24, temperature=0,
                                                                         repetition_penalty=1.3)), timeout=120)
    plain = api_stub.Generate(api.GenerateRequest(prompt=prompt, params=P(max_tokens=24, temperature=0)),
                              timeout=120)
    assert list(resp.token_ids) == ref
    assert list(plain.token_ids) != ref          # the penalty really changed the output
