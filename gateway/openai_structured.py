"""Structured output in an OpenAI-style body, mapped onto GenerationParams.structured_output.

Accepted, one at a time:
- OpenAI's `response_format`: `{"type": "text"}` (free text), `{"type": "json_object"}`,
  `{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}`;
- vLLM's extras: `guided_json` (a schema, as an object or JSON text), `guided_regex`, `guided_choice` (a list of
  strings), `guided_grammar` (EBNF / GBNF);
- vLLM's newer `structured_outputs`: an object with one of `json`, `regex`, `choice`, `grammar`, `json_object`.
Only JSON types are checked here; the gRPC path checks the rest, and its messages name the field the client used
(`guided_regex: ...`, `response_format.json_schema.schema: ...`) through the names this returns.
"""
from __future__ import annotations

import json

from protos.tandem.v1 import generation_pb2 as api

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
FIELDS = ("response_format", "structured_outputs") + GUIDED
_FIELD = "params.structured_output"
# structured_outputs' keys -> the kinds of StructuredOutput
_STRUCTURED_OUTPUTS_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                            "json_object": "json_object"}


class BadStructuredField(ValueError):
    """A 400 naming `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def structured_output(body: dict) -> tuple[api.StructuredOutput | None, dict[str, str]]:
    """The spec the body asks for (None: free text), and the gRPC field paths -> the JSON names it came from."""
    given = [name for name in FIELDS if name in body]
    if len(given) > 1:
        raise BadStructuredField(given[1], f"only one of {', '.join(given)} may be set")
    if not given:
        return None, {}
    name = given[0]
    value = body[name]
    if name == "response_format":
        return _response_format(value)
    if name == "structured_outputs":
        return _structured_outputs(value)
    kind = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
            "guided_grammar": "grammar"}[name]
    return _spec(kind, value, name), _names(kind, name)


def _response_format(fmt: object) -> tuple[api.StructuredOutput | None, dict[str, str]]:
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise BadStructuredField("response_format", f"must be an object with a type, got {fmt!r}")
    kind = fmt["type"]
    if kind == "text":
        return None, {}
    if kind == "json_object":
        return api.StructuredOutput(json_object=True), _names("json_object", "response_format")
    if kind != "json_schema":
        raise BadStructuredField("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")
    inner = fmt.get("json_schema")
    if not isinstance(inner, dict):
        raise BadStructuredField("response_format.json_schema", f"must be an object with a schema, got {inner!r}")
    if "schema" not in inner:
        raise BadStructuredField("response_format.json_schema.schema", "is required")
    where = "response_format.json_schema.schema"
    return _spec("json_schema", inner["schema"], where), _names("json_schema", where)


def _structured_outputs(value: object) -> tuple[api.StructuredOutput, dict[str, str]]:
    if not isinstance(value, dict):
        raise BadStructuredField("structured_outputs", f"must be an object, got {value!r}")
    keys = [k for k in value if value[k] is not None]
    unknown = [k for k in keys if k not in _STRUCTURED_OUTPUTS_KEYS]
    if unknown:
        raise BadStructuredField(f"structured_outputs.{unknown[0]}", "not an option this server implements "
                                 f"({', '.join(_STRUCTURED_OUTPUTS_KEYS)} are)")
    if len(keys) != 1:
        raise BadStructuredField("structured_outputs", f"set exactly one of {', '.join(_STRUCTURED_OUTPUTS_KEYS)}")
    key = keys[0]
    kind, where = _STRUCTURED_OUTPUTS_KEYS[key], f"structured_outputs.{key}"
    if kind == "json_object":
        if value[key] is not True:
            raise BadStructuredField(where, f"must be true, got {value[key]!r}")
        return api.StructuredOutput(json_object=True), _names(kind, where)
    return _spec(kind, value[key], where), _names(kind, where)


def _spec(kind: str, value: object, where: str) -> api.StructuredOutput:
    if kind == "json_schema":
        if isinstance(value, str):
            return api.StructuredOutput(json_schema=value)   # JSON text: the gRPC checks parse it
        if not isinstance(value, (dict, bool)):
            raise BadStructuredField(where, f"must be a JSON Schema (an object), got {value!r}")
        return api.StructuredOutput(json_schema=json.dumps(value))
    if kind == "choice":
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise BadStructuredField(where, f"must be a list of strings, got {value!r}")
        return api.StructuredOutput(choice=api.ChoiceList(choices=value))
    if not isinstance(value, str):
        raise BadStructuredField(where, f"must be a string, got {value!r}")
    return api.StructuredOutput(**{kind: value})


def _names(kind: str, where: str) -> dict[str, str]:
    """gRPC paths in validation and engine messages -> the JSON name the client used."""
    inner = f"{_FIELD}.{kind}.choices" if kind == "choice" else f"{_FIELD}.{kind}"
    return {_FIELD: where, inner: where, f"{_FIELD}.{kind}": where}
