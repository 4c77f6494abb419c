"""Structured output through the gRPC API on SmolLM2 (the session stack runs --async-scheduling): sampled JSON that
always validates against its schema, regex and choice outputs that always match (greedy, sampled, n = 3,
streamed), a stop string that cuts a constrained output, and invalid specs refused with INVALID_ARGUMENT naming
the field, whether the gateway or the engine finds them. Then through the HTTP API with the `openai` client: each
form (response_format json_object / json_schema, vLLM's guided_* and structured_outputs) once, and bad specs as
BadRequestError naming the JSON field."""
from __future__ import annotations

import json
import re

import grpc
import pytest

from protos.tandem.v1 import generation_pb2 as api

jsonschema = pytest.importorskip("jsonschema")

P = api.GenerationParams
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]},
                 "minItems": 1, "maxItems": 3},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "role", "tags", "address"],
}
DATE = r"\d{4}-\d{2}-\d{2}"
CHOICES = ["positive", "negative", "neutral"]


def chat(text: str) -> api.Chat:
    return api.Chat(messages=[api.ChatMessage(role="user", content=text)])


def test_fifty_sampled_json_outputs_all_validate_against_the_schema(api_stub):
    """10 concurrent requests x n = 5, sampled at temperature 1 with seeds: 50 of 50 parse and validate."""
    so = api.StructuredOutput(json_schema=json.dumps(PERSON))
    calls = [api_stub.Generate.future(api.GenerateRequest(
        chat=chat(f"Describe person number {i} of a small company as a JSON record."),
        params=P(temperature=1.0, seed=1000 + i, n=5, max_tokens=128, structured_output=so)), timeout=900)
        for i in range(10)]
    texts = [c.text for call in calls for c in call.result().completions]
    assert len(texts) == 50
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(texts)) > 10   # sampled: not one answer repeated


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_and_choice_always_match_greedy_and_sampled_with_n_3(api_stub, temperature):
    date = api.StructuredOutput(regex=DATE)
    mood = api.StructuredOutput(choice=api.ChoiceList(choices=CHOICES))
    calls = [api_stub.Generate.future(api.GenerateRequest(
        chat=chat(text), params=P(temperature=temperature, seed=3, n=3, max_tokens=16, structured_output=so)),
        timeout=600) for text, so in [("When was the Eiffel Tower finished? Give the date.", date),
                                      ("Sentiment of 'what a dull, grey day'?", mood)]]
    dates, moods = (call.result() for call in calls)
    assert len(dates.completions) == 3 and len(moods.completions) == 3
    for c in dates.completions:
        assert re.fullmatch(DATE, c.text) and c.finish_reason == api.FINISH_REASON_STOP, c.text
    for c in moods.completions:
        assert c.text in CHOICES and c.finish_reason == api.FINISH_REASON_STOP, c.text
    if temperature == 0.0:   # n greedy samples are one answer
        assert len({c.text for c in dates.completions}) == 1


def test_a_streamed_constrained_output_is_the_whole_one(api_stub):
    req = api.GenerateRequest(chat=chat("When was the Eiffel Tower finished? Give the date."),
                              params=P(temperature=0.0, max_tokens=16, structured_output=api.StructuredOutput(
                                  regex=DATE)))
    whole = api_stub.Generate(req, timeout=300)
    streamed = "".join(m.text for m in api_stub.GenerateStream(req, timeout=300))
    assert streamed == whole.text and re.fullmatch(DATE, streamed)


def test_a_stop_string_cuts_a_constrained_output(api_stub):
    req = api.GenerateRequest(chat=chat("When was the Eiffel Tower finished? Give the date."),
                              params=P(temperature=0.0, max_tokens=16, stop=["-"],
                                       structured_output=api.StructuredOutput(regex=DATE)))
    resp = api_stub.Generate(req, timeout=300)
    assert re.fullmatch(r"\d{4}", resp.text) and resp.stop_string == "-"
    assert resp.finish_reason == api.FINISH_REASON_STOP


@pytest.mark.parametrize("so,message", [
    (api.StructuredOutput(json_schema="{not json"), "params.structured_output.json_schema: not valid JSON"),
    (api.StructuredOutput(json_schema='{"type": "nonsense"}'), "params.structured_output.json_schema: "),
    (api.StructuredOutput(regex="(unclosed"), "params.structured_output.regex: "),
    (api.StructuredOutput(grammar="root ::= missing"), "params.structured_output.grammar: "),
])
def test_an_invalid_spec_is_invalid_argument_naming_the_field(api_stub, so, message):
    """The first is caught by the gateway; the others only compile in the engine, which rejects them."""
    with pytest.raises(grpc.RpcError) as e:
        api_stub.Generate(api.GenerateRequest(prompt="Hi", params=P(max_tokens=4, structured_output=so)),
                          timeout=120)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(message), e.value.details()


# --- the HTTP API (the openai client) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(stack):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=stack.http_url, api_key="unused", max_retries=0, timeout=300)


def ask(client, text: str, **kw) -> str:
    resp = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": text}],
                                          max_tokens=128, **kw)
    assert resp.choices[0].finish_reason == "stop"
    return resp.choices[0].message.content


def test_response_format_json_schema_and_json_object(client):
    text = ask(client, "Describe a colleague as a JSON record.", temperature=1.0, seed=4,
               response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(text), PERSON)
    assert isinstance(json.loads(ask(client, "Give me a JSON object with a cat's name and age.", temperature=0,
                                     response_format={"type": "json_object"})), dict)


def test_vllm_guided_extras_and_structured_outputs(client, api_stub):
    date_question = "When was the Eiffel Tower finished? Give the date."
    date = ask(client, date_question, temperature=0, extra_body={"guided_regex": DATE})
    grpc_date = api_stub.Generate(api.GenerateRequest(chat=chat(date_question), params=P(
        temperature=0, max_tokens=128, structured_output=api.StructuredOutput(regex=DATE))), timeout=300)
    assert re.fullmatch(DATE, date) and date == grpc_date.text   # the same request on both APIs
    assert ask(client, "Sentiment of 'great'?", temperature=1.0, seed=2,
               extra_body={"guided_choice": CHOICES}) in CHOICES
    jsonschema.validate(json.loads(ask(client, "A colleague as JSON.", temperature=0,
                                       extra_body={"guided_json": PERSON})), PERSON)
    assert re.fullmatch(r"(yes|no)!", ask(client, "Is water wet?", temperature=0,
                                          extra_body={"guided_grammar": 'root ::= ("yes" | "no") "!"'}))
    assert ask(client, "Sentiment of 'awful'?", temperature=0,
               extra_body={"structured_outputs": {"choice": CHOICES}}) in CHOICES


@pytest.mark.parametrize("extra,param", [
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": "{not json"}, "guided_json"),
])
def test_a_bad_spec_is_a_bad_request_naming_the_json_field(client, extra, param):
    import openai

    kw = {"response_format": extra["response_format"]} if "response_format" in extra else {"extra_body": extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=4, **kw)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["message"].startswith(f"{param}: ")


def test_the_readme_structured_output_example(stack):
    import subprocess
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"```bash\n(curl [^`]*guided_regex[^`]*?)```", readme)
    assert block, "the README shows a structured-output curl example"
    port = stack.http_url.split(":")[-1].split("/")[0]
    command = block.group(1).replace("localhost:8000", f"127.0.0.1:{port}")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert re.fullmatch(DATE, json.loads(out.stdout)["choices"][0]["message"]["content"]), out.stdout
