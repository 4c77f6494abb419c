"""Security, backpressure, request ids and lifecycle on one real stack (`tandem serve`, SmolLM2 on the CPU) whose
gateway runs with TLS, API keys, max_in_flight 2 and JSON request logs. The drain test runs a second, plaintext
gateway against the same tokenizer and engine and SIGTERMs it."""
from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.admission import RETRY_AFTER_KEY
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import engine_pb2_grpc
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc
from tests.e2e.conftest import START_TIMEOUT_S, free_port
from tests.e2e.test_grpcurl import _split_json_stream, grpcurl
from tests.tls_certs import TlsFiles, write_ca_and_server_cert

KEY = "tandem-test-key-0123456789"
AUTH = (("authorization", f"Bearer {KEY}"),)
LONG = api.GenerationParams(max_tokens=4000, temperature=0, ignore_eos=True)   # runs until cancelled


@dataclass(frozen=True)
class SecuredStack:
    address: str            # localhost:PORT, the name the certificate carries
    engine_address: str
    tokenizer_address: str
    tls: TlsFiles
    log: Path
    http_url: str = ""      # https://localhost:PORT/v1, the OpenAI-compatible API with the same TLS and keys


def _wait(predicate, what: str, timeout_s: float = START_TIMEOUT_S, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s} s" + (f"; log:\n{log.read_text()[-4000:]}"
                                                                         if log else ""))
        time.sleep(0.3)


def _health(channel: grpc.Channel) -> str:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    except grpc.RpcError as e:
        return e.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@pytest.fixture(scope="module")
def secured(smollm2_gguf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    tls = write_ca_and_server_cert(tmp)
    (tmp / "keys").write_text(f"# test keys\n{KEY}\n")
    ports = [free_port() for _ in range(5)]
    log = tmp / "serve.log"
    cmd = [sys.executable, "-c", "from gateway.cli.main import main; main()", "serve",
           "--model", str(smollm2_gguf), "--host", "127.0.0.1", "--port", str(ports[0]),
           "--tokenizer-port", str(ports[1]), "--engine-port", str(ports[2]), "--metrics-port", str(ports[3]),
           "--http-port", str(ports[4]), "--device", "cpu",
           "--dtype", "float32", "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca),
           "--api-key-file", str(tmp / "keys"), "--max-in-flight", "2", "--max-prompt-chars", "2000",
           "--max-request-bytes", "65536", "--log-format", "json",
           "--", "--num-kv-blocks", "256", "--max-num-seqs", "8"]
    env = {k: v for k, v in os.environ.items() if k != "TANDEM_API_KEYS"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**env, "PYTHONUNBUFFERED": "1"})
    stack = SecuredStack(f"localhost:{ports[0]}", f"127.0.0.1:{ports[2]}", f"127.0.0.1:{ports[1]}", tls, log,
                         f"https://localhost:{ports[4]}/v1")
    with grpc.secure_channel(stack.address, _creds(tls)) as ch:
        _wait(lambda: proc.poll() is not None or _health(ch) == "SERVING", "the secured stack serving", log=log)
    if proc.poll() is not None:
        pytest.fail(f"tandem serve exited; log:\n{log.read_text()[-4000:]}")
    yield stack
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("tandem serve did not stop within 60 s of Ctrl-C")
    assert proc.returncode == 0, log.read_text()[-4000:]


def _creds(tls: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes())


def _openai(secured: SecuredStack, key: str) -> openai.OpenAI:
    trust = ssl.create_default_context(cafile=secured.tls.ca)
    return openai.OpenAI(base_url=secured.http_url, api_key=key, max_retries=0, timeout=120,
                         http_client=openai.DefaultHttpxClient(verify=trust))


@pytest.fixture(scope="module")
def stub(secured):
    with grpc.secure_channel(secured.address, _creds(secured.tls)) as ch:
        yield generation_pb2_grpc.GenerationStub(ch)


def _engine_idle(engine_address: str) -> bool:
    with grpc.insecure_channel(engine_address) as ch:
        load = engine_pb2_grpc.EngineStub(ch).GetLoad(epb.EngineLoadRequest(), timeout=5)
    return load.num_running == 0 and load.num_waiting == 0 and load.kv_blocks_used == 0


# --- security ------------------------------------------------------------------------------------------------------

def test_tls_client_with_the_ca_streams_and_plaintext_fails(secured, stub):
    chunks = list(stub.GenerateStream(api.GenerateRequest(prompt="The capital of France is",
                                                          params=api.GenerationParams(max_tokens=6, temperature=0)),
                                      metadata=AUTH, timeout=120))
    assert "".join(c.text for c in chunks).startswith(" Paris") and chunks[-1].usage.completion_tokens == 6
    with grpc.insecure_channel(secured.address) as plain:
        with pytest.raises(grpc.RpcError) as e:
            generation_pb2_grpc.GenerationStub(plain).Generate(api.GenerateRequest(prompt="hi"), metadata=AUTH,
                                                               timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_api_keys_over_grpcurl_and_health_stays_open(secured):
    body = json.dumps({"prompt": "The capital of France is", "params": {"max_tokens": 4, "temperature": 0}})
    base = [grpcurl(), "-cacert", str(secured.tls.ca), "-d", body]
    method = "tandem.v1.Generation/GenerateStream"

    def call(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra, secured.address, method], capture_output=True, text=True, timeout=120)

    missing = call()
    assert missing.returncode != 0 and "Unauthenticated" in missing.stderr and "missing API key" in missing.stderr
    wrong = call("-H", "authorization: Bearer wrong-key-xyz")
    assert wrong.returncode != 0 and "invalid API key" in wrong.stderr and "wrong-key-xyz" not in wrong.stderr
    ok = call("-H", f"authorization: Bearer {KEY}")
    assert ok.returncode == 0, ok.stderr
    messages = [json.loads(m) for m in _split_json_stream(ok.stdout)]
    assert "".join(m.get("text", "") for m in messages).startswith(" Paris")
    health = subprocess.run([grpcurl(), "-cacert", str(secured.tls.ca), secured.address,
                             "grpc.health.v1.Health/Check"], capture_output=True, text=True, timeout=60)
    assert json.loads(health.stdout) == {"status": "SERVING"}


def test_the_http_api_takes_the_same_keys_over_https(secured):
    with pytest.raises(openai.AuthenticationError) as wrong:
        _openai(secured, "wrong-key-xyz").completions.create(model="SmolLM2-135M-Instruct", prompt="Hi",
                                                             max_tokens=2)
    assert wrong.value.status_code == 401 and wrong.value.body["message"] == "invalid API key"
    chunks = list(_openai(secured, KEY).chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
        stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "length"


# --- backpressure and limits ---------------------------------------------------------------------------------------

def test_past_max_in_flight_resource_exhausted_carries_retry_after_ms(secured, stub):
    held = [stub.GenerateStream(api.GenerateRequest(prompt=f"Count to a thousand, take {i}:", params=LONG),
                                metadata=AUTH, timeout=300) for i in range(2)]
    try:
        for call in held:
            next(call)   # both are in flight
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(api.GenerateRequest(prompt="one more"), metadata=AUTH, timeout=60)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_in_flight 2" in e.value.details()
        assert dict(e.value.trailing_metadata())[RETRY_AFTER_KEY] == "1000"
        # One bound for both fronts: the HTTP API is at capacity too.
        with pytest.raises(openai.RateLimitError) as limited:
            _openai(secured, KEY).completions.create(model="SmolLM2-135M-Instruct", prompt="one more")
        assert limited.value.response.headers["Retry-After"] == "1" and "max_in_flight 2" in limited.value.message
    finally:
        for call in held:
            call.cancel()
    _wait(lambda: _engine_idle(secured.engine_address), "the engine freeing the cancelled requests", 60)


def test_engine_capacity_rejection_carries_retry_after_ms_too(stub):
    # 256 KV blocks of 16 tokens hold 4096 tokens; the engine refuses what could never fit (RESOURCE_EXHAUSTED).
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(api.GenerateRequest(prompt="Hi", params=api.GenerationParams(max_tokens=6000)),
                      metadata=AUTH, timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV blocks" in e.value.details()
    assert dict(e.value.trailing_metadata())[RETRY_AFTER_KEY] == "1000"


def test_engine_capacity_rejection_over_http_is_429_with_retry_after(secured):
    with pytest.raises(openai.RateLimitError) as e:
        _openai(secured, KEY).completions.create(model="SmolLM2-135M-Instruct", prompt="Hi", max_tokens=6000)
    assert "KV blocks" in e.value.message and e.value.response.headers["retry-after-ms"] == "1000"


def test_size_limits(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(api.GenerateRequest(prompt="x" * 2001), metadata=AUTH, timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details() == "prompt: 2001 characters, more than the limit of 2000"
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(api.GenerateRequest(prompt="x" * 70000), metadata=AUTH, timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.value.details()


# --- deadlines and request ids -------------------------------------------------------------------------------------

def test_a_short_deadline_ends_with_deadline_exceeded_and_frees_the_engine(secured, stub):
    call = stub.GenerateStream(api.GenerateRequest(prompt="Tell me a long story.", params=LONG), metadata=AUTH,
                               timeout=3)
    with pytest.raises(grpc.RpcError) as e:
        for _ in call:
            pass
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait(lambda: _engine_idle(secured.engine_address), "the engine aborting the expired request", 60)


def test_x_request_id_reaches_the_response_and_the_json_log(secured, stub):
    chunks = list(stub.GenerateStream(api.GenerateRequest(prompt="Hello", params=api.GenerationParams(
        max_tokens=3, temperature=0)), metadata=AUTH + (("x-request-id", "trace-e2e-7"),), timeout=120))
    assert {c.request_id for c in chunks} == {"trace-e2e-7"}

    def lines() -> list[dict]:
        out = []
        for raw in secured.log.read_text().splitlines():
            if '"request_id":"trace-e2e-7"' in raw:
                out.append(json.loads(raw[raw.index("{"):]))
        return out
    _wait(lambda: [x["event"] for x in lines()] == ["start", "first_token", "finish"], "the request's log lines",
          30, secured.log)
    finish = lines()[-1]
    assert (finish["status"], finish["prompt_tokens"], finish["output_tokens"]) == ("OK", 1, 3)
    assert finish["replica"] == secured.engine_address


# --- drain ---------------------------------------------------------------------------------------------------------

def test_sigterm_drains_in_flight_refuses_new_and_exits_0(secured, tmp_path):
    port = free_port()
    log = tmp_path / "gateway.log"
    with open(log, "w") as out:
        gw = subprocess.Popen([sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
                               "--engine", secured.engine_address, "--tokenizer", secured.tokenizer_address,
                               "--drain-timeout", "120"], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.getcwd()})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            _wait(lambda: _health(ch) == "SERVING", "the second gateway serving", 60, log)
            stub = generation_pb2_grpc.GenerationStub(ch)
            inflight = stub.GenerateStream(api.GenerateRequest(prompt="Count slowly:", params=api.GenerationParams(
                max_tokens=40, temperature=0, ignore_eos=True)), timeout=300)
            first = next(inflight)
            gw.send_signal(signal.SIGTERM)
            _wait(lambda: _health(ch) == "NOT_SERVING", "health NOT_SERVING", 30, log)
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(api.GenerateRequest(prompt="too late"), timeout=30)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and e.value.details().startswith("draining")
            rest = list(inflight)
            assert rest[-1].finish_reason == api.FINISH_REASON_LENGTH
            assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 40
        assert gw.wait(60) == 0, log.read_text()
    finally:
        if gw.poll() is None:
            gw.kill()
