"""The public server's policies (API keys, admission bound, drain, request ids and logs, size limits) on an
in-process grpc.aio server with a scripted Generation servicer: each test decides when a stream may go on, so
nothing depends on timing."""
from __future__ import annotations

import asyncio
import json
import logging

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway.cli import healthcheck
from gateway.admission import RETRY_AFTER_KEY, Admission
from gateway.auth import ENV_VAR, check_metadata, key_matches, load_api_keys
from gateway.config import GatewayConfig
from protos.service_logging import JsonFormatter
from gateway.public_server import add_public_port, create_server, drain
from gateway.request_log import InvalidRequestId, validate_request_id
from gateway.validation import InvalidRequest, validate
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc
from tests.tls_certs import write_ca_and_server_cert

KEY = "s3cret-key"


class ScriptedGeneration(generation_pb2_grpc.GenerationServicer):
    """Streams three chunks; the second waits for `release`. Records the request ids and cancellations."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.request_ids: list[str] = []
        self.cancelled = 0

    async def GenerateStream(self, request, context):
        self.request_ids.append(request.request_id)
        try:
            yield api.GenerateStreamResponse(request_id=request.request_id, text="a", token_ids=[1])
            self.started.set()
            await self.release.wait()
            yield api.GenerateStreamResponse(request_id=request.request_id, text="b", token_ids=[2])
            last = api.GenerateStreamResponse(request_id=request.request_id, text="c", token_ids=[3],
                                              finish_reason=api.FINISH_REASON_LENGTH)
            last.usage.prompt_tokens, last.usage.completion_tokens = 4, 3
            yield last
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def _start(config: GatewayConfig):
    admission = Admission(config.max_in_flight, config.retry_after_ms)
    server = create_server(config, admission)
    servicer = ScriptedGeneration()
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = add_public_port(server, config)
    await server.start()
    return server, servicer, health_servicer, admission, f"127.0.0.1:{port}"


def _run(config: GatewayConfig, scenario) -> None:
    async def main():
        server, servicer, health_servicer, admission, address = await _start(config)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                await scenario(generation_pb2_grpc.GenerationStub(channel), health_pb2_grpc.HealthStub(channel),
                               servicer, server, health_servicer, admission)
        finally:
            await server.stop(0)
    asyncio.run(main())


def _config(**kw) -> GatewayConfig:
    return GatewayConfig(host="127.0.0.1", port=0, **kw)


async def _collect(call) -> list[api.GenerateStreamResponse]:
    """The rest of the stream (read() style, so it mixes with an earlier call.read())."""
    out = []
    while (r := await call.read()) is not grpc.aio.EOF:
        out.append(r)   # read() raises the call's error status
    return out


# --- API keys ------------------------------------------------------------------------------------------------------

def test_keys_load_from_file_and_env(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# ops keys\nalpha\n\n  beta  \n")
    assert load_api_keys(str(f), {ENV_VAR: "gamma, alpha,"}) == ("alpha", "beta", "gamma")
    assert load_api_keys(None, {}) == ()
    with pytest.raises(ValueError, match="cannot read"):
        load_api_keys(str(tmp_path / "missing"), {})
    with pytest.raises(ValueError, match="no whitespace"):
        load_api_keys(None, {ENV_VAR: "a b"})


def test_key_check_messages_never_echo_the_key():
    keys = ("alpha", "beta")
    assert key_matches("beta", keys) and not key_matches("bet", keys) and not key_matches("", keys)
    assert check_metadata([("authorization", "Bearer alpha")], keys) is None
    assert check_metadata([("authorization", "bearer beta")], keys) is None
    assert "missing API key" in check_metadata([], keys)
    assert "expected 'Bearer <key>'" in check_metadata([("authorization", "Basic x")], keys)
    wrong = check_metadata([("authorization", "Bearer guessed-key")], keys)
    assert wrong == "invalid API key" and "guessed" not in wrong


def test_auth_on_the_server(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    f = tmp_path / "keys"
    f.write_text(KEY + "\n")

    async def scenario(stub, health_stub, servicer, *_):
        servicer.release.set()
        for metadata, message in ((None, "missing API key"), ((("authorization", "Bearer nope-nope"),),
                                                               "invalid API key")):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _collect(stub.GenerateStream(api.GenerateRequest(prompt="x"), metadata=metadata))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert message in e.value.details() and "nope" not in e.value.details()
        assert servicer.request_ids == []   # refused before the servicer ran
        ok = await _collect(stub.GenerateStream(api.GenerateRequest(prompt="x"),
                                                metadata=(("authorization", f"Bearer {KEY}"),)))
        assert "".join(r.text for r in ok) == "abc"
        # health stays open without a key
        reply = await health_stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    _run(_config(api_key_file=str(f)), scenario)


# --- admission: max in flight, drain -------------------------------------------------------------------------------

def test_past_max_in_flight_is_resource_exhausted_with_a_retry_hint():
    async def scenario(stub, _h, servicer, *_):
        first = stub.GenerateStream(api.GenerateRequest(prompt="x"))
        assert (await first.read()).text == "a"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _collect(stub.GenerateStream(api.GenerateRequest(prompt="y")))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 requests in flight (max_in_flight 1)" in e.value.details()
        assert (RETRY_AFTER_KEY, "750") in tuple(e.value.trailing_metadata())
        servicer.release.set()
        assert "".join(r.text for r in await _collect(first)) == "bc"
        assert "".join(r.text for r in await _collect(stub.GenerateStream(api.GenerateRequest(prompt="z")))) \
            == "abc"   # the slot is free again
    _run(_config(max_in_flight=1, retry_after_ms=750), scenario)


def test_drain_refuses_new_calls_reports_not_serving_and_lets_in_flight_finish():
    async def scenario(stub, health_stub, servicer, server, health_servicer, admission):
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        inflight = stub.GenerateStream(api.GenerateRequest(prompt="x"))
        assert (await inflight.read()).text == "a"
        draining = asyncio.ensure_future(drain(server, health_servicer, admission, timeout_s=60))
        while not admission.draining:
            await asyncio.sleep(0)
        reply = await health_stub.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _collect(stub.GenerateStream(api.GenerateRequest(prompt="y")))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and e.value.details().startswith("draining")
        servicer.release.set()
        assert "".join(r.text for r in await _collect(inflight)) == "bc"
        assert await draining == 0
    _run(_config(), scenario)


def test_drain_timeout_ends_the_rest_with_unavailable_and_cancels_their_work(caplog):
    caplog.set_level(logging.INFO, logger="tandem.gateway.requests")
    async def scenario(stub, _h, servicer, server, health_servicer, admission):
        inflight = stub.GenerateStream(api.GenerateRequest(prompt="x"))
        assert (await inflight.read()).text == "a"
        assert await drain(server, health_servicer, admission, timeout_s=0) == 1
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _collect(inflight)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details()
        assert servicer.cancelled == 1   # the servicer's cleanup (the engine abort) ran
    _run(_config(), scenario)
    errors = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "error"]
    assert [(e["status"], e["output_tokens"]) for e in errors] == [("UNAVAILABLE", 1)]   # tokens sent so far


# --- request ids and logs ------------------------------------------------------------------------------------------

def test_x_request_id_becomes_the_request_id_and_shows_in_every_log_line(caplog):
    caplog.set_level(logging.INFO, logger="tandem.gateway.requests")

    async def scenario(stub, _h, servicer, *_):
        servicer.release.set()
        out = await _collect(stub.GenerateStream(api.GenerateRequest(prompt="x"),
                                                 metadata=(("x-request-id", "trace-42"),)))
        assert {r.request_id for r in out} == {"trace-42"}
        # the request's own field wins over the metadata
        await _collect(stub.GenerateStream(api.GenerateRequest(prompt="x", request_id="own"),
                                           metadata=(("x-request-id", "trace-43"),)))
        # neither: the gateway assigns one before the servicer runs
        await _collect(stub.GenerateStream(api.GenerateRequest(prompt="x")))
        assert servicer.request_ids[:2] == ["trace-42", "own"] and len(servicer.request_ids[2]) == 32
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _collect(stub.GenerateStream(api.GenerateRequest(prompt="x"),
                                               metadata=(("x-request-id", "x" * 129),)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details() == "x-request-id: at most 128 characters, got 129"
    _run(_config(), scenario)
    lines = [json.loads(JsonFormatter("gateway").format(r))
             for r in caplog.records if r.name == "tandem.gateway.requests"]
    traced = [line for line in lines if line["request_id"] == "trace-42"]
    assert [line["event"] for line in traced] == ["start", "first_token", "finish"]
    finish = traced[-1]
    assert finish["status"] == "OK" and finish["prompt_tokens"] == 4 and finish["output_tokens"] == 3
    assert finish["replica"] == "127.0.0.1:50053" and finish["elapsed_ms"] >= finish["ttft_ms"] >= 0


def test_request_id_validation():
    assert validate_request_id("a" * 128) == "a" * 128
    for bad, why in (("", "must not be empty"), ("tab\there", "printable ASCII"), ("caf\u00e9", "printable ASCII"),
                     (b"raw", "binary")):
        with pytest.raises(InvalidRequestId, match=why):
            validate_request_id(bad)


def test_an_aborted_call_logs_its_status(caplog):
    caplog.set_level(logging.INFO, logger="tandem.gateway.requests")

    async def scenario(stub, _h, servicer, *_):
        first = stub.GenerateStream(api.GenerateRequest(prompt="x", request_id="holder"))
        assert (await first.read()).text == "a"
        with pytest.raises(grpc.aio.AioRpcError):
            await _collect(stub.GenerateStream(api.GenerateRequest(prompt="y", request_id="refused")))
        servicer.release.set()
        await _collect(first)
    _run(_config(max_in_flight=1), scenario)
    errors = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "error"]
    assert [(e["request_id"], e["status"]) for e in errors] == [("refused", "RESOURCE_EXHAUSTED")]


# --- size limits ---------------------------------------------------------------------------------------------------

def test_request_larger_than_max_request_bytes_is_resource_exhausted():
    async def scenario(stub, _h, servicer, *_):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await _collect(stub.GenerateStream(api.GenerateRequest(prompt="x" * 5000)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.value.details()
        assert servicer.request_ids == []
    _run(_config(max_request_bytes=4096), scenario)


def test_max_prompt_chars():
    config = GatewayConfig(max_prompt_chars=10)
    assert validate(api.GenerateRequest(prompt="x" * 10), config, 100).prompt == "x" * 10
    with pytest.raises(InvalidRequest, match="prompt: 11 characters, more than the limit of 10"):
        validate(api.GenerateRequest(prompt="x" * 11), config, 100)
    chat = api.Chat(messages=[api.ChatMessage(role="user", content="x" * 6)] * 2)
    with pytest.raises(InvalidRequest, match="chat.messages: 12 characters of content, more than the limit of 10"):
        validate(api.GenerateRequest(chat=chat), config, 100)


# --- TLS -----------------------------------------------------------------------------------------------------------

def test_tls_port_serves_a_client_with_the_ca_and_the_healthcheck_probe(tmp_path):
    tls = write_ca_and_server_cert(tmp_path)
    config = _config(tls_cert=str(tls.cert), tls_key=str(tls.key))

    async def main():
        server, servicer, health_servicer, _admission, address = await _start(config)
        servicer.release.set()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        port = address.rsplit(":", 1)[1]
        try:
            creds = grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes())
            async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
                out = await _collect(generation_pb2_grpc.GenerationStub(channel).GenerateStream(
                    api.GenerateRequest(prompt="x")))
                assert "".join(r.text for r in out) == "abc"
            async with grpc.aio.insecure_channel(address) as plain:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await _collect(generation_pb2_grpc.GenerationStub(plain).GenerateStream(
                        api.GenerateRequest(prompt="x"), timeout=10))
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            probe = await asyncio.to_thread(healthcheck.main, [address, "--tls-ca", str(tls.ca)])
            plain_probe = await asyncio.to_thread(healthcheck.main, [address, "--timeout", "2"])
            assert (probe, plain_probe) == (0, 1)
        finally:
            await server.stop(0)
    asyncio.run(main())
