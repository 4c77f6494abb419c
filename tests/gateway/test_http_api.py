"""The HTTP API's policies on an in-process server with a scripted generation flow (no model, no engine): API keys
with the real openai client, 429 with Retry-After at capacity, 503 while draining and for a drained stream,
errors before and after a stream starts, a client that leaves mid-stream ending its request, and aiohttp's own
errors as OpenAI error objects. Each test decides when a stream may go on, so nothing depends on timing."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import grpc
import openai
import pytest

from gateway.admission import Admission
from gateway.config import GatewayConfig
from gateway.generation import RequestFailed
from gateway.http_api import HttpApi
from gateway.metrics import GatewayMetrics
from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.v1 import generation_pb2 as api

KEY = "s3cret-key"
MODEL = "fake-model"
WAIT_S = 10.0   # a bound on waiting, not a speed claim


class ScriptedFlow:
    """Streams "a", then waits for `release`, then "b" and the end (or `failure`, raised there). Records how many
    streams were closed, however they ended."""

    def __init__(self) -> None:
        self.pipeline = SimpleNamespace(engine_info=epb.EngineInfo(model_name=MODEL, max_model_len=128),
                                        engine_stub=SimpleNamespace(ListAdapters=self._list_adapters))
        self.metrics = GatewayMetrics(MODEL, 128)
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.failure: RequestFailed | None = None
        self.before_first: RequestFailed | None = None
        self.requests: list[api.GenerateRequest] = []

    async def _list_adapters(self, request, timeout=None):
        return epb.ListAdaptersResponse(adapters=[epb.AdapterInfo(name="sql", path="/a/sql")])

    async def stream(self, request, time_remaining=None):
        self.requests.append(request)
        try:
            if self.before_first is not None:
                raise self.before_first
            yield api.GenerateStreamResponse(request_id=request.request_id, text="a", token_ids=[1])
            self.started.set()
            await self.release.wait()
            if self.failure is not None:
                raise self.failure
            last = api.GenerateStreamResponse(request_id=request.request_id, text="b", token_ids=[2],
                                              finish_reason=api.FINISH_REASON_LENGTH)
            last.usage.prompt_tokens, last.usage.completion_tokens = 3, 2
            yield last
        finally:
            self.closed.set()


def _run(scenario, keys: tuple[str, ...] = (), **config) -> None:
    async def main():
        cfg = GatewayConfig(host="127.0.0.1", http_port=0, **config)
        flow, admission = ScriptedFlow(), Admission(cfg.max_in_flight, cfg.retry_after_ms)
        server = HttpApi(cfg, flow, admission, keys)
        await server.start()
        url = f"http://127.0.0.1:{server.port}"
        try:
            async with aiohttp.ClientSession() as session:
                await scenario(url, session, flow, admission)
        finally:
            await server.stop()
    asyncio.run(main())


def _client(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


BODY = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}


def test_api_keys_with_the_openai_client_and_open_health_and_metrics():
    async def scenario(url, session, flow, admission):
        flow.release.set()
        with pytest.raises(openai.AuthenticationError) as err:
            await _client(url, "guessed-key").completions.create(**BODY)
        assert err.value.status_code == 401 and err.value.body["message"] == "invalid API key"
        assert err.value.body["code"] == "invalid_api_key"
        async with session.post(f"{url}/v1/completions", json=BODY) as r:
            assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            assert (await r.json())["error"]["message"].startswith("missing API key: send header 'authorization:")
        async with session.get(f"{url}/v1/models") as r:
            assert r.status == 401
        done = await _client(url, KEY).completions.create(**BODY)
        assert done.choices[0].text == "ab" and done.usage.total_tokens == 5
        models = await _client(url, KEY).models.list()
        assert [(m.id, m.parent) for m in models.data] == [(MODEL, None), ("sql", MODEL)]
        for path in ("/health", "/metrics"):
            async with session.get(url + path) as r:
                assert r.status == 200, path
        assert flow.requests[0].prompt == "Hi"   # only the authenticated call reached the flow
        assert len(flow.requests) == 1
    _run(scenario, keys=(KEY,))


def test_past_max_in_flight_429_with_retry_after():
    async def scenario(url, session, flow, admission):
        first = await session.post(f"{url}/v1/completions", json={**BODY, "stream": True})
        await asyncio.wait_for(flow.started.wait(), WAIT_S)
        async with session.post(f"{url}/v1/completions", json=BODY) as r:
            assert r.status == 429
            assert (r.headers["Retry-After"], r.headers["retry-after-ms"]) == ("3", "2500")
            error = (await r.json())["error"]
            assert error["type"] == "rate_limit_error" and "max_in_flight 1" in error["message"]
        with pytest.raises(openai.RateLimitError):
            await _client(url).completions.create(**BODY)
        flow.release.set()
        text = await first.text()
        first.release()
        assert text.endswith("data: [DONE]\n\n")
        assert admission.in_flight == 0
        # Each prompt of a call is a generation in flight: more prompts than the bound can never be admitted.
        with pytest.raises(openai.BadRequestError, match="prompt: at most 1 prompts"):
            await _client(url).completions.create(**{**BODY, "prompt": ["a", "b"]})
    _run(scenario, max_in_flight=1, retry_after_ms=2500)


def test_draining_refuses_with_503_and_health_says_so():
    async def scenario(url, session, flow, admission):
        admission.draining = True
        async with session.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
                                ) as r:
            assert r.status == 503 and (await r.json())["error"]["message"].startswith("draining")
        async with session.get(f"{url}/health") as r:
            assert r.status == 503
        assert not flow.requests
    _run(scenario)


def test_a_drain_that_times_out_ends_a_started_stream_with_an_error_event():
    async def scenario(url, session, flow, admission):
        async with session.post(f"{url}/v1/completions", json={**BODY, "stream": True}) as r:
            await asyncio.wait_for(flow.started.wait(), WAIT_S)
            assert await admission.drain(0.0) == 1
            events = _events(await r.text())
        assert events[0]["choices"][0]["text"] == "a"
        assert events[1]["error"]["message"].startswith("draining: the server shut down")
        assert events[1]["error"]["code"] == "unavailable" and events[2] == "[DONE]"
        assert flow.closed.is_set() and admission.in_flight == 0
    _run(scenario)


def test_a_failure_before_the_first_chunk_gets_its_status_and_one_after_an_error_event():
    async def scenario(url, session, flow, admission):
        flow.before_first = RequestFailed(grpc.StatusCode.NOT_FOUND, "adapter: 'nope' is not loaded")
        with pytest.raises(openai.NotFoundError) as err:
            await _client(url).completions.create(**{**BODY, "model": "nope"}, stream=True)
        assert err.value.body == {"message": "model: 'nope' is not loaded", "type": "invalid_request_error",
                                  "param": "model", "code": "model_not_found"}
        flow.before_first = RequestFailed(grpc.StatusCode.RESOURCE_EXHAUSTED, "engine queue full", 1000)
        async with session.post(f"{url}/v1/completions", json=BODY) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "1"
        flow.before_first = None
        flow.failure = RequestFailed(grpc.StatusCode.INTERNAL, "request r: detokenizing failed: boom")
        flow.release.set()
        stream = await _client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)
        with pytest.raises(openai.APIError, match="detokenizing failed: boom"):
            async for chunk in stream:
                assert chunk.choices[0].delta.content == "a" and chunk.choices[0].delta.role == "assistant"
    _run(scenario)


def test_a_client_that_leaves_mid_stream_ends_its_request():
    async def scenario(url, session, flow, admission):
        r = await session.post(f"{url}/v1/completions", json={**BODY, "stream": True})
        await asyncio.wait_for(flow.started.wait(), WAIT_S)
        r.close()   # drops the connection while the flow waits for its next chunk
        await asyncio.wait_for(flow.closed.wait(), WAIT_S)
        for _ in range(100):
            if admission.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert admission.in_flight == 0
    _run(scenario)


def test_aiohttp_errors_and_bad_bodies_are_openai_error_objects():
    async def scenario(url, session, flow, admission):
        cases = [(session.get(f"{url}/v1/nothing"), 404), (session.get(f"{url}/v1/completions"), 405),
                 (session.post(f"{url}/v1/completions", data=b"{not json"), 400),
                 (session.post(f"{url}/v1/completions", data=b"x" * 2048), 413),
                 (session.post(f"{url}/v1/completions", json=BODY, headers={"x-request-id": "x" * 129}), 400)]
        for call, status in cases:
            async with call as r:
                assert r.status == status
                error = (await r.json())["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert not flow.requests
    _run(scenario, max_request_bytes=1024)


def test_the_request_id_comes_from_the_header_and_names_the_response():
    async def scenario(url, session, flow, admission):
        flow.release.set()
        async with session.post(f"{url}/v1/completions", json=BODY, headers={"x-request-id": "abc-1"}) as r:
            body = await r.json()
        assert r.headers["X-Request-Id"] == "abc-1" and body["id"] == "cmpl-abc-1"
        assert flow.requests[-1].request_id == "abc-1"
        async with session.post(f"{url}/v1/completions", json={**BODY, "request_id": "own"},
                                headers={"x-request-id": "abc-2"}) as r:
            assert (await r.json())["id"] == "cmpl-own"
    _run(scenario)


def _events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: ")
        data = block[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out
