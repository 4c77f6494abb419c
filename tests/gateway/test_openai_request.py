"""OpenAI JSON -> tandem.v1.GenerateRequest: every parameter lands on its gRPC field, JSON type errors name the JSON
field, and the gRPC validator's messages come back under the names the client used."""
from __future__ import annotations

import pytest

from gateway.config import GatewayConfig
from gateway.openai_request import CHAT, COMPLETIONS, BadField, UnknownModel, parse, translate
from gateway.validation import InvalidRequest, validate
from protos.tandem.v1 import generation_pb2 as api

BASE = "SmolLM2-135M-Instruct"
CONFIG = GatewayConfig()
VOCAB = 49152


def one(body: dict, kind: str = COMPLETIONS) -> api.GenerateRequest:
    req = parse(body, kind, BASE)
    assert len(req.requests) == 1
    return req.requests[0]


def test_every_parameter_reaches_its_grpc_field():
    body = {"model": BASE, "prompt": "Hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 40,
            "min_p": 0.05, "seed": 2 ** 63, "n": 2, "best_of": 3, "presence_penalty": 0.5, "frequency_penalty": -0.5,
            "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": True, "include_stop_str_in_output": True,
            "skip_special_tokens": False, "spaces_between_special_tokens": False, "stop": ["\n", "END"],
            "stop_token_ids": [2], "allowed_token_ids": [5, 6], "logit_bias": {"5": 10, "6": -1.5},
            "logprobs": 3, "prompt_logprobs": 1, "priority": -1, "cache_salt": "tenant", "request_id": "r-1",
            "user": "someone", "echo": True}
    r = one(body)
    p = r.params
    assert (r.prompt, r.adapter, r.priority, r.cache_salt, r.request_id) == ("Hi", "", -1, "tenant", "r-1")
    assert (p.max_tokens, p.top_k, p.seed, p.n, p.best_of, p.min_tokens) == (7, 40, 2 ** 63, 2, 3, 2)
    assert (p.temperature, p.top_p, p.min_p) == pytest.approx((0.5, 0.9, 0.05))
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == pytest.approx((0.5, -0.5, 1.1))
    assert (p.ignore_eos, p.include_stop_str_in_output, p.skip_special_tokens, p.spaces_between_special_tokens,
            p.echo) == (True, True, False, False, True)
    assert list(p.stop) == ["\n", "END"] and list(p.stop_token_ids) == [2] and list(p.allowed_token_ids) == [5, 6]
    assert dict(p.logit_bias) == {5: 10.0, 6: -1.5}
    assert (p.logprobs, p.prompt_logprobs) == (3, 1)    # the explicit prompt_logprobs wins over echo's
    beam = one({"prompt": "Hi", "use_beam_search": True, "length_penalty": 0.5, "best_of": 4}).params
    assert (beam.use_beam_search, beam.length_penalty, beam.best_of) == (True, 0.5, 4)


def test_unset_and_null_leave_the_server_defaults():
    p = one({"prompt": "Hi", "temperature": None, "max_tokens": None, "stop": None}).params
    assert p == api.GenerationParams()
    v = validate(one({"prompt": "Hi"}), CONFIG, VOCAB)
    assert (v.max_tokens, v.temperature, v.n, v.logprobs) == (None, 1.0, 1, None)


def test_chat_messages_logprobs_and_the_token_limit_names():
    req = parse({"messages": [{"role": "developer", "content": "Be brief."},
                              {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text",
                                                                                              "text": "there"}]},
                              {"role": "assistant", "content": None}],
                 "max_tokens": 5, "max_completion_tokens": 9, "logprobs": True, "top_logprobs": 2,
                 "parse_special_tokens": True}, CHAT, BASE)
    r = req.requests[0]
    assert [(m.role, m.content) for m in r.chat.messages] == [("system", "Be brief."), ("user", "Hi there"),
                                                              ("assistant", "")]
    assert r.chat.parse_special_tokens and r.params.max_tokens == 9 and r.params.logprobs == 2
    assert req.logprobs and req.names["params.max_tokens"] == "max_completion_tokens"
    assert req.names["params.logprobs"] == "top_logprobs"
    assert one({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, CHAT).params.logprobs == 0
    assert not one({"messages": [{"role": "user", "content": "x"}]}, CHAT).params.HasField("logprobs")


def test_model_picks_the_adapter():
    assert one({"prompt": "x", "model": BASE}).adapter == ""
    assert one({"prompt": "x"}).adapter == ""
    assert one({"prompt": "x", "model": "sql-lora"}).adapter == "sql-lora"
    assert parse({"prompt": "x"}, COMPLETIONS, BASE).model == BASE
    with pytest.raises(UnknownModel):
        parse({"prompt": "x", "model": "m" * 65}, COMPLETIONS, BASE)


def test_several_prompts_make_several_requests_and_stream_takes_one():
    req = parse({"prompt": ["a", "b"], "n": 2}, COMPLETIONS, BASE)
    assert [r.prompt for r in req.requests] == ["a", "b"] and all(r.params.n == 2 for r in req.requests)
    with pytest.raises(BadField, match="^prompt: a streamed completion takes one prompt, got 2$"):
        parse({"prompt": ["a", "b"], "stream": True}, COMPLETIONS, BASE)


def test_echo_with_logprobs_asks_for_the_prompts_logprobs():
    req = parse({"prompt": "x", "echo": True, "logprobs": 2}, COMPLETIONS, BASE)
    assert req.prompt_logprobs and req.requests[0].params.prompt_logprobs == 2


@pytest.mark.parametrize("kind, body, message", [
    (COMPLETIONS, [], "body: must be a JSON object"),
    (COMPLETIONS, {"prompt": "x", "temprature": 0}, "temprature: not a parameter of /v1/completions"),
    (COMPLETIONS, {"prompt": "x", "top_logprobs": 2}, "top_logprobs: not a parameter of /v1/completions"),
    (CHAT, {"messages": [], "echo": True}, "echo: not a parameter of /v1/chat/completions"),
    (COMPLETIONS, {"prompt": "x", "temperature": "hot"}, "temperature: must be a number, got 'hot'"),
    (COMPLETIONS, {"prompt": "x", "temperature": True}, "temperature: must be a number, got True"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 1.5}, "max_tokens: must be an integer, got 1.5"),
    (COMPLETIONS, {"prompt": "x", "n": -1}, "n: must be an integer in [0, 4294967295], got -1"),
    (COMPLETIONS, {"prompt": "x", "seed": -3}, "seed: must be an integer in [0, 18446744073709551615], got -3"),
    (COMPLETIONS, {"prompt": "x", "ignore_eos": 1}, "ignore_eos: must be true or false, got 1"),
    (COMPLETIONS, {"prompt": "x", "stop": ["a", 3]}, "stop: must be a string or a list of strings"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias: key 'abc' is not a token id"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"5": "up"}}, "logit_bias[5]: must be a number, got 'up'"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [1, -2]}, "stop_token_ids[1]: must be an integer in"),
    (COMPLETIONS, {"prompt": [1, 2, 3]}, "prompt: token id lists are not supported: send text"),
    (COMPLETIONS, {}, "prompt: is required"),
    (COMPLETIONS, {"prompt": "x", "model": 3}, "model: must be a string, got 3"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options: only applies with"),
    (COMPLETIONS, {"prompt": "x", "stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats: not an option"),
    (COMPLETIONS, {"prompt": "x", "request_id": "a\nb"}, "request_id: must be printable ASCII"),
    (COMPLETIONS, {"prompt": "x", "response_format": {"type": "xml"}}, "response_format.type: must be text, "),
    (CHAT, {"messages": "hi"}, "messages: must be a list of messages, got 'hi'"),
    (CHAT, {"messages": [{"content": "hi"}]}, "messages[0].role: must be a string, got None"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]: only"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs: needs logprobs"),
])
def test_json_type_errors_name_the_json_field(kind, body, message):
    with pytest.raises(BadField) as err:
        parse(body, kind, BASE)
    assert str(err.value).startswith(message)
    assert str(err.value).startswith(err.value.param)


@pytest.mark.parametrize("kind, body, message, param", [
    (COMPLETIONS, {"prompt": "x", "top_p": 1.5}, "top_p: must be in (0, 1], got 1.5", "top_p"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens: must be >= 1, got 0", "max_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
     "max_completion_tokens: must be >= 1, got 0", "max_completion_tokens"),
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs: at most 20, got 21", "top_logprobs"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs: at most 20, got 21", "logprobs"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role: must be one of", "messages"),
    (CHAT, {"messages": []}, "messages: must not be empty", "messages"),
    (COMPLETIONS, {"prompt": ""}, "prompt: must not be empty", "prompt"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias[5]: must be in [-100, 100], got 101.0",
     "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, "stop[0]: must not be empty", "stop"),
    (COMPLETIONS, {"prompt": "x", "n": 3, "best_of": 2}, "best_of: must be in [n, 16] (n is 3), got 2", "best_of"),
    (COMPLETIONS, {"prompt": "x", "min_tokens": 5, "max_tokens": 3}, "min_tokens: 5 is more than max_tokens (3)",
     "min_tokens"),
    (COMPLETIONS, {"prompt": "x", "length_penalty": 2.0}, "length_penalty: only applies with use_beam_search",
     "length_penalty"),
])
def test_validation_messages_come_back_under_the_json_names(kind, body, message, param):
    req = parse(body, kind, BASE)
    with pytest.raises(InvalidRequest) as err:
        validate(req.requests[0], CONFIG, VOCAB)
    translated, named = translate(str(err.value), req.names)
    assert translated.startswith(message) and named == param
    assert str(err.value).endswith(translated.partition(":")[2])   # the same message past the field name


def test_translate_leaves_unmapped_messages_alone():
    assert translate("input: something", {"prompt": "prompt"}) == ("input: something", None)
    assert translate("adapter: 'x' is not loaded", {"adapter": "model"}) == ("model: 'x' is not loaded", "model")
