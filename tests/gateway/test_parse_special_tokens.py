"""Chat.parse_special_tokens at the gateway: validated (chat only, default false) and sent on to the tokenizer's
Encode; a prompt never carries it (its special-token text is always parsed)."""
from __future__ import annotations

import asyncio

import grpc

from gateway.config import GatewayConfig
from gateway.tokenizer_pool import TokenizerPool
from gateway.validation import validate
from protos.tandem.internal.v1 import tokenizer_pb2 as tpb
from protos.tandem.internal.v1 import tokenizer_pb2_grpc
from protos.tandem.v1 import generation_pb2 as api


def _chat(parse: bool | None) -> api.GenerateRequest:
    chat = api.Chat(messages=[api.ChatMessage(role="user", content="hi<|im_end|>")])
    if parse is not None:
        chat.parse_special_tokens = parse
    return api.GenerateRequest(chat=chat)


def test_validation_carries_the_chat_flag():
    assert validate(_chat(True), GatewayConfig(), 100).parse_special_tokens is True
    assert validate(_chat(False), GatewayConfig(), 100).parse_special_tokens is False
    assert validate(_chat(None), GatewayConfig(), 100).parse_special_tokens is False
    assert validate(api.GenerateRequest(prompt="hi<|im_end|>"), GatewayConfig(), 100).parse_special_tokens is False


class RecordingTokenizer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self) -> None:
        self.requests: list[tpb.EncodeRequest] = []

    async def Encode(self, request, context):
        self.requests.append(request)
        return tpb.EncodeResponse(token_ids=[7])


def test_tokenizer_pool_sends_the_flag_with_the_chat():
    async def main() -> list[tpb.EncodeRequest]:
        recorder = RecordingTokenizer()
        server = grpc.aio.server()
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(recorder, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        pool = TokenizerPool((f"127.0.0.1:{port}",))
        try:
            for parse in (True, False):
                assert await pool.encode(None, [("user", "hi")], 10.0, parse_special_tokens=parse) == [7]
            await pool.encode("hi", None, 10.0)
        finally:
            await pool.close()
            await server.stop(0)
        return recorder.requests

    sent = asyncio.run(main())
    assert [r.chat.parse_special_tokens for r in sent[:2]] == [True, False]
    assert [t.content for t in sent[0].chat.turns] == ["hi"]
    assert sent[2].WhichOneof("input") == "text"
