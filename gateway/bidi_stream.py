"""A long-lived bidirectional gRPC stream with one writer queue and one reader task.

Writes never block the caller (they are queued and sent in order by gRPC's request iterator); every received
message goes to on_message. When the stream ends or breaks, on_closed gets the error (None for a clean end).
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import grpc

_CLOSE = object()


class BidiStream:
    def __init__(self, method: Callable[..., Any], on_message: Callable[[Any], None],
                 on_closed: Callable[[BaseException | None], None], name: str) -> None:
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._call = method(self._requests())
        self._on_message = on_message
        self._on_closed = on_closed
        self.name = name
        self.closed = False
        self._reader = asyncio.create_task(self._read(), name=f"{name}-reader")

    async def _requests(self):
        while True:
            msg = await self._outbox.get()
            if msg is _CLOSE:
                return
            yield msg

    async def _read(self) -> None:
        error: BaseException | None = None
        try:
            async for msg in self._call:
                self._on_message(msg)
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            error = e
        except Exception as e:  # a handler bug must surface as a closed stream, not a silent hang
            error = e
        finally:
            self.closed = True
        self._on_closed(error)

    def send(self, msg: Any) -> None:
        if not self.closed:
            self._outbox.put_nowait(msg)

    async def close(self) -> None:
        self.closed = True
        self._outbox.put_nowait(_CLOSE)
        self._call.cancel()
        self._reader.cancel()
        try:
            await self._reader
        except (asyncio.CancelledError, Exception):
            pass


def wait_ready(channel: grpc.aio.Channel, timeout: float) -> Awaitable[None]:
    return asyncio.wait_for(channel.channel_ready(), timeout)


# The tokenizer and engine servers take messages up to this size (gRPC's default is 4 MiB).
MIN_INTERNAL_MESSAGE_BYTES = 256 * 1024 * 1024


def internal_channel_options(max_request_bytes: int) -> tuple[tuple[str, int], ...]:
    """Options of the gateway's channels to its tokenizers and engines.

    They retry a lost backend within a second (gRPC's default backoff grows to two minutes), so a restarted engine
    or tokenizer is seen by the next load poll. Their message limit follows the public one: whatever a public
    request of max_request_bytes becomes on an internal hop (its ids, at most 5 wire bytes each for each byte of
    text, or a step's batch of every request's tokens and logprobs) must pass, or one request's reply would break
    a stream shared by all."""
    limit = max(MIN_INTERNAL_MESSAGE_BYTES, 8 * max_request_bytes)
    return (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit))
