"""params.structured_output: its shape checked here, its grammar compiled by the engine.

The gateway cannot compile a schema, regex or grammar (xgrammar needs torch, which the gateway never imports), so
it checks what it can without one: one kind set, sizes, a JSON schema that parses as JSON, and the parameters it
cannot be combined with. The engine compiles the rest and rejects a spec that does not compile with
INVALID_ARGUMENT naming the same field (`params.structured_output.regex: ...`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api

FIELD = "params.structured_output"
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class InvalidStructuredOutput(ValueError):
    """Maps to INVALID_ARGUMENT; the message names the field."""


@dataclass(frozen=True)
class StructuredOutputSpec:
    kind: str
    spec: str = ""                  # the JSON schema, regex or grammar
    choices: tuple[str, ...] = ()


def validate_structured_output(p: api.GenerationParams, max_chars: int,
                               max_choices: int) -> StructuredOutputSpec | None:
    """max_chars bounds the spec's text (all choices together for a choice list)."""
    if not p.HasField("structured_output"):
        return None
    for name, used in (("use_beam_search", p.use_beam_search), ("ignore_eos", p.ignore_eos),
                       ("min_tokens", p.HasField("min_tokens") and p.min_tokens > 0)):
        if used:
            raise InvalidStructuredOutput(f"params.{name}: cannot be combined with structured_output (the format "
                                          f"decides where the output ends)")
    so = p.structured_output
    kind = so.WhichOneof("kind")
    if kind is None:
        raise InvalidStructuredOutput(f"{FIELD}: set one of {', '.join(KINDS)}")
    where = f"{FIELD}.{kind}"
    if kind == "json_object":
        if not so.json_object:
            raise InvalidStructuredOutput(f"{where}: must be true when set")
        return StructuredOutputSpec(kind)
    if kind == "choice":
        choices = tuple(so.choice.choices)
        if not choices:
            raise InvalidStructuredOutput(f"{where}.choices: must not be empty")
        if len(choices) > max_choices:
            raise InvalidStructuredOutput(f"{where}.choices: at most {max_choices} choices, got {len(choices)}")
        for i, c in enumerate(choices):
            if not c:
                raise InvalidStructuredOutput(f"{where}.choices[{i}]: must not be empty")
        _check_size(where, sum(map(len, choices)), max_chars)
        return StructuredOutputSpec(kind, choices=choices)
    spec = getattr(so, kind)
    if not spec:
        raise InvalidStructuredOutput(f"{where}: must not be empty")
    _check_size(where, len(spec), max_chars)
    if kind == "json_schema":
        _check_json_schema(where, spec)
    return StructuredOutputSpec(kind, spec)


def engine_structured_output(s: StructuredOutputSpec) -> epb.StructuredOutput:
    if s.kind == "json_object":
        return epb.StructuredOutput(json_object=True)
    if s.kind == "choice":
        return epb.StructuredOutput(choice=epb.ChoiceList(choices=s.choices))
    return epb.StructuredOutput(**{s.kind: s.spec})


def _check_size(where: str, size: int, max_chars: int) -> None:
    if size > max_chars:
        raise InvalidStructuredOutput(f"{where}: {size} characters, more than the limit of {max_chars}")


def _check_json_schema(where: str, spec: str) -> None:
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as e:
        raise InvalidStructuredOutput(f"{where}: not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidStructuredOutput(f"{where}: nested too deeply") from None
    if not isinstance(schema, (dict, bool)):
        raise InvalidStructuredOutput(f"{where}: a JSON Schema is an object (or a boolean), got "
                                      f"{type(schema).__name__}")
