"""params.structured_output at the gateway: its shape is checked with messages naming the field, and it reaches the
engine's SamplingParams unchanged (the engine compiles it; see tests/engine/test_structured_output.py)."""
from __future__ import annotations

import pytest

from gateway.config import GatewayConfig
from gateway.structured_output import StructuredOutputSpec, engine_structured_output
from gateway.validation import InvalidRequest, validate
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api

CONFIG = GatewayConfig()


def checked(**params):
    return validate(api.GenerateRequest(prompt="hi", params=api.GenerationParams(**params)), CONFIG, vocab_size=100)


def so(**kind) -> dict:
    return dict(structured_output=api.StructuredOutput(**kind))


@pytest.mark.parametrize("params,expected", [
    (so(json_schema='{"type": "object"}'), StructuredOutputSpec("json_schema", '{"type": "object"}')),
    (so(json_schema="true"), StructuredOutputSpec("json_schema", "true")),
    (so(json_object=True), StructuredOutputSpec("json_object")),
    (so(regex=r"\d+"), StructuredOutputSpec("regex", r"\d+")),
    (so(choice=api.ChoiceList(choices=["yes", "no"])), StructuredOutputSpec("choice", choices=("yes", "no"))),
    (so(grammar='root ::= "a"'), StructuredOutputSpec("grammar", 'root ::= "a"')),
    ({}, None),
])
def test_each_kind_is_kept_and_unset_means_free_text(params, expected):
    assert checked(**params).structured_output == expected


@pytest.mark.parametrize("params,message", [
    (so(), "params.structured_output: set one of json_schema, json_object, regex, choice, grammar"),
    (so(json_object=False), "params.structured_output.json_object: must be true when set"),
    (so(json_schema=""), "params.structured_output.json_schema: must not be empty"),
    (so(json_schema="{'type': 1}"), "params.structured_output.json_schema: not valid JSON: "),
    (so(json_schema="[1, 2]"), "params.structured_output.json_schema: a JSON Schema is an object (or a boolean)"),
    (so(regex=""), "params.structured_output.regex: must not be empty"),
    (so(grammar="x" * (256 * 1024 + 1)), "params.structured_output.grammar: 262145 characters, more than"),
    (so(choice=api.ChoiceList()), "params.structured_output.choice.choices: must not be empty"),
    (so(choice=api.ChoiceList(choices=["a", ""])), "params.structured_output.choice.choices[1]: must not be empty"),
    (so(choice=api.ChoiceList(choices=["a"] * 1025)), "params.structured_output.choice.choices: at most 1024"),
    ({**so(regex="a"), "ignore_eos": True}, "params.ignore_eos: cannot be combined with structured_output"),
    ({**so(regex="a"), "min_tokens": 1}, "params.min_tokens: cannot be combined with structured_output"),
    ({**so(regex="a"), "use_beam_search": True}, "params.use_beam_search: cannot be combined with structured_output"),
])
def test_bad_shapes_name_the_field(params, message):
    with pytest.raises(InvalidRequest) as e:
        checked(**params)
    assert str(e.value).startswith(message)


def test_min_tokens_zero_is_no_conflict():
    assert checked(min_tokens=0, **so(regex="a")).structured_output.kind == "regex"


@pytest.mark.parametrize("spec,expected", [
    (StructuredOutputSpec("json_schema", "{}"), epb.StructuredOutput(json_schema="{}")),
    (StructuredOutputSpec("json_object"), epb.StructuredOutput(json_object=True)),
    (StructuredOutputSpec("regex", "a+"), epb.StructuredOutput(regex="a+")),
    (StructuredOutputSpec("choice", choices=("a", "b")), epb.StructuredOutput(choice=epb.ChoiceList(choices=["a",
                                                                                                          "b"]))),
    (StructuredOutputSpec("grammar", 'root ::= "a"'), epb.StructuredOutput(grammar='root ::= "a"')),
])
def test_the_engine_gets_the_same_spec(spec, expected):
    assert engine_structured_output(spec) == expected
