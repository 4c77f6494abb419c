"""The tokenizer services: round-robin over the live ones for Encode/Decode, one paired with each engine replica
for its Detokenize stream. A tokenizer whose call fails with UNAVAILABLE is marked down at once and the call is
tried on the next live one; the load poller marks it up again when GetInfo answers."""
from __future__ import annotations

import grpc

from protos.tandem.internal.v1 import tokenizer_pb2 as tpb
from protos.tandem.internal.v1 import tokenizer_pb2_grpc


class TokenizerPool:
    def __init__(self, addresses: tuple[str, ...], channel_options: tuple = ()) -> None:
        if not addresses:
            raise ValueError("at least one tokenizer address is required")
        self.addresses = addresses
        self.channels = [grpc.aio.insecure_channel(a, options=channel_options) for a in addresses]
        self.stubs = [tokenizer_pb2_grpc.TokenizerStub(c) for c in self.channels]
        self.live = [False] * len(addresses)
        self._next = 0

    def stub_for(self, replica_index: int) -> tokenizer_pb2_grpc.TokenizerStub:
        """The replica's paired tokenizer when live, else the next live one, else the pair (its stream will fail)."""
        paired = replica_index % len(self.stubs)
        for k in range(len(self.stubs)):
            i = (paired + k) % len(self.stubs)
            if self.live[i]:
                return self.stubs[i]
        return self.stubs[paired]

    def _order(self) -> list[int]:
        """Live tokenizers in round-robin order, then the down ones (a last try beats failing without one)."""
        n = len(self.stubs)
        start, self._next = self._next % n, self._next + 1
        ring = [(start + k) % n for k in range(n)]
        return [i for i in ring if self.live[i]] + [i for i in ring if not self.live[i]]

    async def _call(self, method: str, request, timeout: float | None):
        error: grpc.aio.AioRpcError | None = None
        for i in self._order():
            try:
                resp = await getattr(self.stubs[i], method)(request, timeout=timeout)
                self.live[i] = True
                return resp
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.live[i] = False
                error = e
        raise error

    async def encode(self, prompt: str | None, chat: list[tuple[str, str]] | None, timeout: float | None,
                     *, max_tokens: int = 0, parse_special_tokens: bool = False) -> list[int]:
        """parse_special_tokens applies to a chat only: a prompt's special-token text is always parsed. max_tokens
        > 0: the tokenizer refuses an input of that many tokens or more instead of returning its ids."""
        if prompt is not None:
            req = tpb.EncodeRequest(text=prompt, max_tokens=max_tokens)
        else:
            req = tpb.EncodeRequest(chat=tpb.ChatTurns(turns=[tpb.ChatTurn(role=r, content=c) for r, c in chat],
                                                       parse_special_tokens=parse_special_tokens),
                                    max_tokens=max_tokens)
        return list((await self._call("Encode", req, timeout)).token_ids)

    async def decode(self, ids: list[int], skip_special_tokens: bool, timeout: float | None) -> str:
        req = tpb.DecodeRequest(token_ids=ids, skip_special_tokens=skip_special_tokens)
        return (await self._call("Decode", req, timeout)).text

    async def probe(self, i: int, timeout: float) -> tpb.TokenizerInfo | None:
        try:
            info = await self.stubs[i].GetInfo(tpb.TokenizerInfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            self.live[i] = False
            return None
        self.live[i] = True
        return info

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()
