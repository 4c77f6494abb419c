"""Every bad input gets INVALID_ARGUMENT naming the field, and the stack keeps serving."""
from __future__ import annotations

import grpc
import pytest

from protos.tandem.v1 import generation_pb2 as api

P = api.GenerationParams
CASES = {
    "no input": (api.GenerateRequest(), "input"),
    "empty prompt": (api.GenerateRequest(prompt=""), "prompt"),
    "max_tokens 0": (api.GenerateRequest(prompt="hi", params=P(max_tokens=0)), "params.max_tokens"),
    "negative temperature": (api.GenerateRequest(prompt="hi", params=P(temperature=-0.5)), "params.temperature"),
    "nan temperature": (api.GenerateRequest(prompt="hi", params=P(temperature=float("nan"))), "params.temperature"),
    "top_p 0": (api.GenerateRequest(prompt="hi", params=P(top_p=0.0)), "params.top_p"),
    "top_p above 1": (api.GenerateRequest(prompt="hi", params=P(top_p=1.5)), "params.top_p"),
    "top_k below -1": (api.GenerateRequest(prompt="hi", params=P(top_k=-2)), "params.top_k"),
    "empty stop string": (api.GenerateRequest(prompt="hi", params=P(stop=["ok", ""])), "params.stop[1]"),
    "stop token outside vocab": (api.GenerateRequest(prompt="hi", params=P(stop_token_ids=[10**6])),
                                 "params.stop_token_ids"),
    "prompt longer than context": (api.GenerateRequest(prompt="hello " * 9000), "prompt"),
    "chat longer than context": (api.GenerateRequest(chat=api.Chat(messages=[
        api.ChatMessage(role="user", content="hello " * 9000)])), "chat.messages"),
    "empty chat": (api.GenerateRequest(chat=api.Chat()), "chat.messages"),
    "unknown role": (api.GenerateRequest(chat=api.Chat(messages=[
        api.ChatMessage(role="user", content="hi"), api.ChatMessage(role="wizard", content="x")])),
        "chat.messages[1].role"),
    "missing role": (api.GenerateRequest(chat=api.Chat(messages=[api.ChatMessage(content="hi")])),
                     "chat.messages[0].role"),
    "min_p above 1": (api.GenerateRequest(prompt="hi", params=P(min_p=1.5)), "params.min_p"),
    "repetition_penalty 0": (api.GenerateRequest(prompt="hi", params=P(repetition_penalty=0.0)),
                             "params.repetition_penalty"),
    "presence_penalty 3": (api.GenerateRequest(prompt="hi", params=P(presence_penalty=3.0)),
                           "params.presence_penalty"),
    "nan frequency_penalty": (api.GenerateRequest(prompt="hi", params=P(frequency_penalty=float("nan"))),
                              "params.frequency_penalty"),
    "logit_bias token outside vocab": (api.GenerateRequest(prompt="hi", params=P(logit_bias={10**6: 1.0})),
                                       "params.logit_bias"),
    "logit_bias value 1000": (api.GenerateRequest(prompt="hi", params=P(logit_bias={5: 1000.0})),
                              "params.logit_bias[5]"),
    "allowed token outside vocab": (api.GenerateRequest(prompt="hi", params=P(allowed_token_ids=[1, 10**6])),
                                    "params.allowed_token_ids"),
    "min_tokens above max_tokens": (api.GenerateRequest(prompt="hi", params=P(max_tokens=2, min_tokens=3)),
                                    "params.min_tokens"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_invalid_argument_names_the_field(api_stub, name, method):
    request, field = CASES[name]
    with pytest.raises(grpc.RpcError) as info:
        result = getattr(api_stub, method)(request, timeout=30)
        if method == "GenerateStream":
            list(result)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(field + ":"), info.value.details()


def test_still_serving_after_bad_input(api_stub):
    for request, _ in CASES.values():
        with pytest.raises(grpc.RpcError):
            api_stub.Generate(request, timeout=30)
    resp = api_stub.Generate(api.GenerateRequest(prompt="Hello", params=P(max_tokens=4, temperature=0)), timeout=60)
    assert len(resp.token_ids) == 4 and resp.finish_reason == api.FINISH_REASON_LENGTH
