"""What one request carries through the gateway: what is submitted downstream (Submission), and what comes back
(RequestHandle: its queue of chunks or a failure, and its outputs' state).

RequestHandle has one owner, the Replica that serves the request: only it puts on the queue and updates the state.
The generation flow only reads the handle and takes from its queue."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from protos.tandem.internal.v1 import engine_pb2 as epb
from protos.tandem.internal.v1 import tokenizer_pb2 as tpb


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    message: str


@dataclass(frozen=True)
class TextOptions:
    """How the tokenizer service renders each output's text."""
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True


@dataclass(frozen=True)
class Submission:
    """One request as the gateway submits it: request_id is the gateway's own id for the call, unique among the
    requests in flight; cache_salt and adapter also key the router's prefix-affinity blocks."""
    request_id: str
    prompt_ids: list[int]
    params: epb.SamplingParams
    text: TextOptions = TextOptions()
    priority: int = 0
    cache_salt: str = ""
    adapter: str = ""


@dataclass(frozen=True)
class Chunk:
    """One step's text of one output, with the engine delta it came from (logprobs, cumulative logprob)."""
    index: int
    result: tpb.DetokResult
    delta: epb.RequestDelta


class RequestHandle:
    def __init__(self, request_id: str, prompt_ids: list[int], n: int) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.n = n
        self.queue: asyncio.Queue = asyncio.Queue()   # Chunk | Failure
        self.num_cached_tokens = 0                    # from the engine's first delta
        self.ended: set[int] = set()                  # outputs whose text has ended
        self.engine_done = False                      # the engine sent the request's last delta
        self.replica = ""                             # the engine replica serving it (its address)

    def detok_id(self, index: int) -> str:
        """Each output has its own detokenizer state (text, stop strings)."""
        return self.request_id if self.n == 1 else f"{self.request_id}#{index}"
