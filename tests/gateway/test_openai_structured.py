"""Structured output in OpenAI-style bodies: response_format, vLLM's guided_* and structured_outputs each land on
GenerationParams.structured_output, JSON type errors name the JSON field, and the gRPC checks' messages (the
gateway's, and the engine's for a spec that does not compile) come back under the name the client used."""
from __future__ import annotations

import json

import pytest

from gateway.config import GatewayConfig
from gateway.openai_request import CHAT, COMPLETIONS, BadField, parse, translate
from gateway.validation import InvalidRequest, validate
from protos.tandem.v1 import generation_pb2 as api

BASE = "SmolLM2-135M-Instruct"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
MESSAGES = [{"role": "user", "content": "x"}]


def spec(body: dict, kind: str = CHAT) -> api.StructuredOutput | None:
    body = {"messages": MESSAGES, **body} if kind == CHAT else {"prompt": "x", **body}
    params = parse(body, kind, BASE).requests[0].params
    return params.structured_output if params.HasField("structured_output") else None


@pytest.mark.parametrize("body,expected", [
    ({"response_format": {"type": "json_object"}}, api.StructuredOutput(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
     api.StructuredOutput(json_schema=json.dumps(SCHEMA))),
    ({"guided_json": SCHEMA}, api.StructuredOutput(json_schema=json.dumps(SCHEMA))),
    ({"guided_json": json.dumps(SCHEMA)}, api.StructuredOutput(json_schema=json.dumps(SCHEMA))),
    ({"guided_regex": r"\d+"}, api.StructuredOutput(regex=r"\d+")),
    ({"guided_choice": ["a", "b"]}, api.StructuredOutput(choice=api.ChoiceList(choices=["a", "b"]))),
    ({"guided_grammar": 'root ::= "a"'}, api.StructuredOutput(grammar='root ::= "a"')),
    ({"structured_outputs": {"json": SCHEMA}}, api.StructuredOutput(json_schema=json.dumps(SCHEMA))),
    ({"structured_outputs": {"regex": "a+", "choice": None}}, api.StructuredOutput(regex="a+")),
    ({"structured_outputs": {"choice": ["x"]}}, api.StructuredOutput(choice=api.ChoiceList(choices=["x"]))),
    ({"structured_outputs": {"grammar": 'root ::= "a"'}}, api.StructuredOutput(grammar='root ::= "a"')),
    ({"structured_outputs": {"json_object": True}}, api.StructuredOutput(json_object=True)),
    ({"response_format": {"type": "text"}}, None),
    ({}, None),
])
def test_each_form_reaches_structured_output(body, expected):
    assert spec(body) == expected
    assert spec(body, COMPLETIONS) == expected


@pytest.mark.parametrize("body,message", [
    ({"response_format": "json"}, "response_format: must be an object with a type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema: must be an object with a schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
     "response_format.json_schema.schema: is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema.schema: must be a JSON Schema"),
    ({"guided_regex": 3}, "guided_regex: must be a string, got 3"),
    ({"guided_choice": "a"}, "guided_choice: must be a list of strings"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice: only one of guided_regex, guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_json": {}}, "guided_json: only one of response_format"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs: set exactly one of"),
    ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag: not an option"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object: must be true"),
])
def test_json_type_errors_name_the_json_field(body, message):
    with pytest.raises(BadField) as err:
        spec(body)
    assert str(err.value).startswith(message) and str(err.value).startswith(err.value.param)


@pytest.mark.parametrize("body,message,param", [
    ({"guided_json": "{not json"}, "guided_json: not valid JSON", "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}, "ignore_eos": True},
     "ignore_eos: cannot be combined with structured_output", "ignore_eos"),
    ({"guided_choice": ["a", ""]}, "guided_choice[1]: must not be empty", "guided_choice"),
    ({"guided_choice": []}, "guided_choice: must not be empty", "guided_choice"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex: must not be empty", "structured_outputs.regex"),
])
def test_gateway_check_messages_come_back_under_the_json_names(body, message, param):
    req = parse({"messages": MESSAGES, **body}, CHAT, BASE)
    with pytest.raises(InvalidRequest) as err:
        validate(req.requests[0], GatewayConfig(), 49152)
    translated, named = translate(str(err.value), req.names)
    assert translated.startswith(message) and named == param


@pytest.mark.parametrize("body,param", [
    ({"guided_regex": "("}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),
])
def test_engine_rejections_come_back_under_the_json_names(body, param):
    req = parse({"messages": MESSAGES, **body}, CHAT, BASE)
    kind = req.requests[0].params.structured_output.WhichOneof("kind")
    translated, named = translate(f"params.structured_output.{kind}: the engine's reason", req.names)
    assert (translated, named) == (f"{param}: the engine's reason", param)
