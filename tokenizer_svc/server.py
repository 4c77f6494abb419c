"""The gRPC server: the Tokenizer service, health and reflection, on grpc.aio."""
from __future__ import annotations

import logging
import asyncio
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos.reflection import enable_reflection
from protos.tandem.internal.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tokenizer_svc.chat_template import ChatTemplateError
from tokenizer_svc.config import TokenizerServiceConfig
from tokenizer_svc.detokenizer import Detokenizer
from tokenizer_svc.loaded import LoadedTokenizer, NoChatTemplateError
from tokenizer_svc.token_span import max_bytes_per_token

_LOG = logging.getLogger("tandem.tokenizer.service")

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name

# One Detokenize message carries every running request's prompt ids when they open; gRPC's 4 MiB default
# would refuse a batch of long prompts.
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_SERVER_OPTIONS = [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES)]


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    def __init__(self, loaded: LoadedTokenizer):
        self._loaded = loaded
        self._info = tokenizer_pb2.TokenizerInfo(vocab_size=loaded.vocab_size,
                                                 eos_token_ids=loaded.eos_token_ids,
                                                 has_chat_template=loaded.chat_template is not None,
                                                 max_bytes_per_token=max_bytes_per_token(loaded.tokenizer))

    async def GetInfo(self, request, context):
        return self._info

    async def Encode(self, request, context):
        which = request.WhichOneof("input")
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "EncodeRequest needs `text` or `chat`")
        try:
            if which == "text":
                # Off the event loop: a long prompt takes milliseconds and Detokenize streams must keep flowing.
                ids = await asyncio.to_thread(self._loaded.encode_text, request.text)
            else:
                messages = [{"role": t.role, "content": t.content} for t in request.chat.turns]
                if not messages:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "chat has no turns")
                ids = await asyncio.to_thread(self._loaded.encode_chat, messages, request.chat.parse_special_tokens)
        except (NoChatTemplateError, ChatTemplateError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if request.max_tokens and len(ids) >= request.max_tokens:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE,
                                f"prompt: {len(ids)} tokens do not fit the model's context of {request.max_tokens} "
                                f"tokens (at most {request.max_tokens - 1} leave room to generate)")
        return tokenizer_pb2.EncodeResponse(token_ids=ids)

    async def Decode(self, request, context):
        vocab_size = self._loaded.vocab_size
        bad = [i for i in request.token_ids if i >= vocab_size]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token ids {bad[:5]} are outside the vocabulary (size {vocab_size})")
        text = self._loaded.decode(request.token_ids, request.skip_special_tokens)
        return tokenizer_pb2.DecodeResponse(text=text)

    async def Detokenize(self, request_iterator, context):
        detokenizer = Detokenizer(self._loaded.tokenizer)  # request ids are scoped to this stream
        async for message in request_iterator:
            yield detokenizer.handle(message)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_server(config: TokenizerServiceConfig, loaded: LoadedTokenizer) -> RunningServer:
    """Binds config.address (port 0: an ephemeral port), starts serving, and reports SERVING."""
    server = grpc.aio.server(options=_SERVER_OPTIONS)
    tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(loaded), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    port = server.add_insecure_port(config.address)
    if port == 0:
        raise OSError(f"could not bind {config.address}")
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health_servicer)


async def serve(config: TokenizerServiceConfig, loaded: LoadedTokenizer) -> None:
    """Serves until SIGTERM or SIGINT, then stops, letting in-flight RPCs finish within config.grace_s."""
    running = await start_server(config, loaded)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _LOG.info("listening on %s:%d", config.host, running.port)
    await stop.wait()
    await running.stop(config.grace_s)
