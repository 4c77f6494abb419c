"""The text options of GenerationParams (ignore_eos, include_stop_str_in_output, skip_special_tokens,
spaces_between_special_tokens) through the whole stack, and the stop-string limits."""
from __future__ import annotations

import grpc
import pytest

from protos.tandem.v1 import generation_pb2 as api

P = api.GenerationParams
PROMPT = "The capital of France is"
IM_START, IM_END = 1, 2      # SmolLM2's <|im_start|> and <|im_end|> (its EOS)


def generate(api_stub, max_tokens: int = 12, **params) -> api.GenerateResponse:
    return api_stub.Generate(api.GenerateRequest(prompt=PROMPT, params=P(max_tokens=max_tokens, temperature=0,
                                                                         **params)), timeout=120)


def stream(api_stub, max_tokens: int = 12, **params) -> list[api.GenerateStreamResponse]:
    return list(api_stub.GenerateStream(api.GenerateRequest(prompt=PROMPT, params=P(
        max_tokens=max_tokens, temperature=0, **params)), timeout=120))


@pytest.fixture(scope="module")
def plain(api_stub) -> api.GenerateResponse:
    resp = generate(api_stub, ignore_eos=True)
    assert len(resp.token_ids) == 12 and len(resp.text) > 8
    return resp


def test_include_stop_str_in_output(api_stub, plain):
    # A stop string starting mid-token, taken from the greedy text: it must end the text when included, and be
    # cut when not; nothing after it is ever sent, whole or streamed.
    at = 3 if plain.text[3:6].strip() else 4
    stop = plain.text[at:at + 3]
    start = plain.text.index(stop)
    for include, expected in ((True, plain.text[:start + len(stop)]), (False, plain.text[:start])):
        resp = generate(api_stub, ignore_eos=True, stop=[stop], include_stop_str_in_output=include)
        assert (resp.text, resp.stop_string, resp.finish_reason) == (expected, stop, api.FINISH_REASON_STOP)
        assert list(resp.token_ids) == list(plain.token_ids[:len(resp.token_ids)])
        chunks = stream(api_stub, ignore_eos=True, stop=[stop], include_stop_str_in_output=include)
        assert "".join(c.text for c in chunks) == expected
        assert chunks[-1].stop_string == stop


def test_skip_special_tokens_false_shows_special_tokens(api_stub):
    forced = {"logit_bias": {IM_START: 100.0}, "ignore_eos": True}
    hidden = generate(api_stub, max_tokens=3, **forced)
    assert list(hidden.token_ids) == [IM_START] * 3 and hidden.text == ""   # skip_special_tokens defaults to true
    shown = generate(api_stub, max_tokens=3, skip_special_tokens=False, **forced)
    assert list(shown.token_ids) == [IM_START] * 3 and shown.text == "<|im_start|>" * 3
    # SmolLM2's byte-level decoder puts nothing between special tokens, so the spacing option changes nothing
    # (as in transformers, whose fast decode ignores it).
    for spaces in (True, False):
        assert generate(api_stub, max_tokens=3, skip_special_tokens=False, spaces_between_special_tokens=spaces,
                        **forced).text == shown.text


def test_ignore_eos_generates_past_eos_to_max_tokens(api_stub):
    eos_first = generate(api_stub, max_tokens=5, logit_bias={IM_END: 100.0})
    assert list(eos_first.token_ids) == [IM_END] and eos_first.finish_reason == api.FINISH_REASON_STOP
    assert eos_first.stop_token_id == IM_END
    past = generate(api_stub, max_tokens=5, logit_bias={IM_END: 100.0}, ignore_eos=True)
    assert list(past.token_ids) == [IM_END] * 5 and past.finish_reason == api.FINISH_REASON_LENGTH
    assert past.usage.completion_tokens == 5 and past.text == ""


@pytest.mark.parametrize("params, field", [
    (P(stop=[f"s{i}" for i in range(17)]), "params.stop:"),
    (P(stop=["ok", "x" * 257]), "params.stop[1]:"),
])
def test_stop_string_limits(api_stub, params, field):
    for method in ("Generate", "GenerateStream"):
        with pytest.raises(grpc.RpcError) as info:
            result = getattr(api_stub, method)(api.GenerateRequest(prompt="hi", params=params), timeout=30)
            if method == "GenerateStream":
                list(result)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field), info.value.details()
    # 16 stop strings are fine.
    assert generate(api_stub, max_tokens=2, stop=[f"@{i}@" for i in range(16)]).finish_reason
