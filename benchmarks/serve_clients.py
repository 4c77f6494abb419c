"""The two ways `tandem bench serve` streams one request: the gRPC API (GenerateStream) or the OpenAI-compatible
HTTP API (POST /v1/completions, server-sent events). Both send the same request (greedy, max_tokens, ignore_eos)
and fill the same RequestRecord: a chunk's time and token count for every message that carried tokens, the
finish reason and the prompt tokens from the usage at the end. Over HTTP the token counts come from vLLM's
`return_token_ids` extra, so both count tokens exactly."""
from __future__ import annotations

import json
import time

import aiohttp
import grpc

from benchmarks.serve_stats import RequestRecord
from protos.tandem.v1 import generation_pb2 as api
from protos.tandem.v1 import generation_pb2_grpc

APIS = ("grpc", "openai")


class GrpcClient:
    def __init__(self, address: str) -> None:
        self.address = address

    async def __aenter__(self) -> "GrpcClient":
        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self._channel.close()

    async def stream(self, rec: RequestRecord, prompt: str, ignore_eos: bool, request_id: str) -> None:
        params = api.GenerationParams(max_tokens=rec.max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        request = api.GenerateRequest(prompt=prompt, params=params, request_id=request_id)
        rec.sent = time.perf_counter()
        try:
            async for msg in self._stub.GenerateStream(request):
                now = time.perf_counter()
                if msg.token_ids:
                    rec.chunk_times.append(now)
                    rec.chunk_tokens.append(len(msg.token_ids))
                    rec.output_tokens += len(msg.token_ids)
                if msg.finish_reason:
                    rec.finish_reason = api.FinishReason.Name(msg.finish_reason).removeprefix("FINISH_REASON_")
                    rec.prompt_tokens = msg.usage.prompt_tokens
            if not rec.chunk_times:
                rec.error = "the stream carried no tokens"
        except grpc.RpcError as err:
            rec.error = f"{err.code().name}: {err.details()}"


class OpenAIClient:
    """address: HOST:PORT of the HTTP API, or its base URL (http[s]://HOST:PORT)."""

    def __init__(self, address: str) -> None:
        base = address if address.startswith(("http://", "https://")) else f"http://{address}"
        self.url = base.rstrip("/").removesuffix("/v1") + "/v1/completions"

    async def __aenter__(self) -> "OpenAIClient":
        # No connection cap: the load generator's own concurrency limit decides how many streams are open.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None))
        return self

    async def __aexit__(self, *exc) -> None:
        await self._session.close()

    async def stream(self, rec: RequestRecord, prompt: str, ignore_eos: bool, request_id: str) -> None:
        body = {"prompt": prompt, "max_tokens": rec.max_tokens, "temperature": 0.0, "ignore_eos": ignore_eos,
                "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
                "request_id": request_id}
        rec.sent = time.perf_counter()
        try:
            async with self._session.post(self.url, json=body) as resp:
                if resp.status != 200:
                    rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                    return
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    now = time.perf_counter()
                    event = json.loads(line[6:])
                    if "error" in event:
                        rec.error = f"stream error: {event['error'].get('message')}"
                        return
                    for choice in event["choices"]:
                        if choice.get("token_ids"):
                            rec.chunk_times.append(now)
                            rec.chunk_tokens.append(len(choice["token_ids"]))
                            rec.output_tokens += len(choice["token_ids"])
                        if choice.get("finish_reason"):
                            rec.finish_reason = choice["finish_reason"].upper()
                    if event.get("usage"):
                        rec.prompt_tokens = event["usage"]["prompt_tokens"]
            if not rec.chunk_times:
                rec.error = "the stream carried no tokens"
        except aiohttp.ClientError as err:
            rec.error = f"{type(err).__name__}: {err}"


def client_for(api_name: str, address: str) -> GrpcClient | OpenAIClient:
    return GrpcClient(address) if api_name == "grpc" else OpenAIClient(address)
