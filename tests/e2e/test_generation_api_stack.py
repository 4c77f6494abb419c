"""n, best_of, beam search, logprobs, prompt_logprobs and echo through the whole stack on SmolLM2, against
transformers on the same GGUF where there is a reference; bad combinations get INVALID_ARGUMENT."""
from __future__ import annotations

import math

import grpc
import pytest

from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api

P = api.GenerationParams
PROMPT = "The capital of France is"


def stream(api_stub, prompt: str = PROMPT, **params) -> list[api.GenerateStreamResponse]:
    return list(api_stub.GenerateStream(api.GenerateRequest(prompt=prompt, params=P(**params)), timeout=180))


def by_index(chunks) -> dict[int, dict]:
    outs: dict[int, dict] = {}
    for c in chunks:
        o = outs.setdefault(c.index, dict(text="", ids=[], logprobs=[], finish=0, cumulative=None))
        o["text"] += c.text
        o["ids"] += list(c.token_ids)
        o["logprobs"] += list(c.logprobs)
        if c.finish_reason:
            o["finish"], o["cumulative"] = c.finish_reason, c.cumulative_logprob
    return outs


def test_n_seeded_samples_are_reproducible_and_distinct(api_stub, engine_stub):
    params = dict(max_tokens=8, temperature=1.0, seed=123, n=3)
    first = stream(api_stub, **params)
    outs = by_index(first)
    assert sorted(outs) == [0, 1, 2]
    assert all(o["finish"] == api.FINISH_REASON_LENGTH and len(o["ids"]) == 8 for o in outs.values())
    assert len({tuple(o["ids"]) for o in outs.values()}) == 3
    assert by_index(stream(api_stub, **params)) == outs
    last = first[-1]
    assert last.usage.completion_tokens == 24 and sum(1 for c in first if c.HasField("usage")) == 1
    assert engine_stub.GetLoad(epb.EngineLoadRequest(), timeout=10).kv_blocks_used == 0


def test_logprobs_equal_transformers_with_token_text(api_stub, hf_reference):
    import torch

    tok, model = hf_reference
    chunks = stream(api_stub, max_tokens=5, temperature=0, logprobs=3, prompt_logprobs=2)
    out = by_index(chunks)[0]
    prompt_ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([prompt_ids + out["ids"]])).logits[0].float().log_softmax(-1)
    assert len(out["logprobs"]) == 5
    for j, lp in enumerate(out["logprobs"]):
        row = ref[len(prompt_ids) - 1 + j]
        assert lp.token_id == out["ids"][j] and lp.token == tok.decode([lp.token_id])
        assert math.isclose(lp.logprob, row[lp.token_id].item(), abs_tol=2e-3)
        assert [t.token_id for t in lp.top] == row.topk(3).indices.tolist()
        assert [t.token for t in lp.top] == [tok.decode([t.token_id]) for t in lp.top]
    plp = chunks[0].prompt_logprobs
    assert [e.token_id for e in plp] == prompt_ids and plp[0].logprob == 0 and not plp[0].top
    for p, e in enumerate(plp[1:], start=1):
        assert math.isclose(e.logprob, ref[p - 1, prompt_ids[p]].item(), abs_tol=2e-3) and len(e.top) == 2
    assert math.isclose(by_index(chunks)[0]["cumulative"], sum(lp.logprob for lp in out["logprobs"]), abs_tol=1e-3)


def test_beam_search_equals_transformers(api_stub, hf_reference):
    import torch

    tok, model = hf_reference
    prompt_ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt_ids]), num_beams=3, num_return_sequences=2, do_sample=False,
                             max_new_tokens=6, early_stopping=False, eos_token_id=2, pad_token_id=2,
                             output_scores=True, return_dict_in_generate=True)
    resp = api_stub.Generate(api.GenerateRequest(prompt=PROMPT, params=P(max_tokens=6, use_beam_search=True,
                                                                         beam_width=3, n=2)), timeout=180)
    assert len(resp.completions) == 2
    for c, seq, score in zip(resp.completions, ref.sequences.tolist(), ref.sequences_scores.tolist()):
        expected = seq[len(prompt_ids):]
        if 2 in expected:
            expected = expected[:expected.index(2) + 1]
        assert list(c.token_ids) == expected
        assert math.isclose(c.cumulative_logprob / len(expected), score, abs_tol=2e-3)
    assert resp.text == resp.completions[0].text and resp.usage.completion_tokens == sum(
        len(c.token_ids) for c in resp.completions)


def test_best_of_returns_the_most_likely_and_echo_repeats_the_prompt(api_stub):
    resp = api_stub.Generate(api.GenerateRequest(prompt=PROMPT, params=P(max_tokens=6, temperature=1.0, seed=5,
                                                                         n=2, best_of=4, echo=True)), timeout=180)
    a, b = resp.completions
    assert a.cumulative_logprob >= b.cumulative_logprob
    assert a.text.startswith(PROMPT) and b.text.startswith(PROMPT) and len(a.text) > len(PROMPT)
    assert resp.usage.completion_tokens == 12


@pytest.mark.parametrize("params,field", [
    (P(use_beam_search=True, temperature=0.8), "params.temperature"),
    (P(n=4, best_of=2), "params.best_of"),
    (P(n=17), "params.n"),
    (P(beam_width=2), "params.beam_width"),
    (P(logprobs=21), "params.logprobs"),
    (P(use_beam_search=True, logprobs=2), "params.logprobs"),
    (P(top_k=-2), "params.top_k"),
    (P(logit_bias={10 ** 6: 1.0}), "params.logit_bias"),
    (P(stop=["x"] * 17), "params.stop"),
])
def test_bad_combinations_are_invalid_argument(api_stub, params, field):
    with pytest.raises(grpc.RpcError) as e:
        api_stub.Generate(api.GenerateRequest(prompt=PROMPT, params=params), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field), e.value.details()
