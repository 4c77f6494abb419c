"""`tandem generate`: one GenerateStream call on the public API, text deltas streamed to stdout as they arrive.

stdout carries only the generated text, so it can be piped; the finish reason and usage go to stderr.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Iterable, TextIO

import grpc

from gateway.tls import channel_credentials
from protos.tandem.v1 import generation_pb2 as pb
from protos.tandem.v1 import generation_pb2_grpc as pb_grpc


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """A shell passes `--stop "\\n\\n"` as backslash-n twice: \\n, \\t, \\r and \\\\ become the characters they name.
    Any other backslash stays as typed."""
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


@dataclass(frozen=True)
class GenerateOptions:
    """What the user asked for; unset (None) sampling fields take the server's defaults."""

    prompt: str
    chat: bool = False
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 means greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k is not None and self.top_k < -1:
            raise ValueError("top_k must be >= -1 (0 and -1 mean off)")
        if self.seed is not None and not 0 <= self.seed < 2 ** 64:
            raise ValueError("seed must be in [0, 2**64)")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach the gateway: TLS (trusting tls_ca, or the system roots) and an API key."""

    tls: bool = False
    tls_ca: str | None = None
    api_key: str | None = None

    def channel(self, address: str) -> grpc.Channel:
        if not self.tls:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, channel_credentials(self.tls_ca))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def build_request(opts: GenerateOptions) -> pb.GenerateRequest:
    params = pb.GenerationParams(stop=list(opts.stop))
    # Only fields the user set are sent: proto3 `optional` keeps "unset" apart from 0 (temperature 0 = greedy).
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        value = getattr(opts, name)
        if value is not None:
            setattr(params, name, value)
    # A system prompt only has a meaning in a chat, so --system implies --chat.
    if opts.chat or opts.system is not None:
        messages = []
        if opts.system is not None:
            messages.append(pb.ChatMessage(role="system", content=opts.system))
        messages.append(pb.ChatMessage(role="user", content=opts.prompt))
        return pb.GenerateRequest(chat=pb.Chat(messages=messages), params=params)
    return pb.GenerateRequest(prompt=opts.prompt, params=params)


def summary(last: pb.GenerateStreamResponse | None) -> str:
    """One line for stderr: finish reason, which stop matched, and token usage."""
    if last is None:
        return "finish_reason=NONE (the stream ended without a message)"
    parts = [f"finish_reason={pb.FinishReason.Name(last.finish_reason).removeprefix('FINISH_REASON_')}"]
    which = last.WhichOneof("stop_reason")
    if which == "stop_string":
        parts.append(f"stop_string={last.stop_string!r}")
    elif which == "stop_token_id":
        parts.append(f"stop_token_id={last.stop_token_id}")
    parts.append(f"prompt_tokens={last.usage.prompt_tokens} completion_tokens={last.usage.completion_tokens}")
    if last.request_id:
        parts.append(f"request_id={last.request_id}")
    return " ".join(parts)


def write_stream(responses: Iterable[pb.GenerateStreamResponse], out: TextIO, err: TextIO) -> None:
    """Writes each text delta as it arrives, then the summary line."""
    last = None
    ends_with_newline = True
    for response in responses:
        last = response
        if response.text:
            out.write(response.text)
            out.flush()
            ends_with_newline = response.text.endswith("\n")
    if not ends_with_newline:
        err.write("\n")  # on a terminal, keeps the summary off the end of the text without touching stdout
    err.write(summary(last) + "\n")
    err.flush()


def run_generate(opts: GenerateOptions, address: str, timeout_s: float | None = None,
                 out: TextIO | None = None, err: TextIO | None = None,
                 connection: ConnectionOptions = ConnectionOptions()) -> int:
    """Returns the exit status: 0 on success, 1 on a gRPC error, 130 on Ctrl-C (the call is cancelled).
    out/err default to the process's streams at call time."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    with connection.channel(address) as channel:
        call = pb_grpc.GenerationStub(channel).GenerateStream(build_request(opts), timeout=timeout_s,
                                                              metadata=connection.metadata())
        try:
            write_stream(call, out, err)
        except grpc.RpcError as error:
            out.flush()
            err.write(f"error: {error.code().name}: {error.details()}\n")
            err.flush()
            return 1
        except KeyboardInterrupt:
            call.cancel()  # tells the gateway, which aborts the request in the engine
            err.write("\ncancelled\n")
            return 130
    return 0
