"""tandem.v1 generation results as OpenAI response objects: text_completion and chat.completion (whole), their
streamed chunks, usage, and logprobs in each endpoint's format. Fields OpenAI does not have follow vLLM:
`stop_reason` (the stop string or stop token id that ended a choice) and, with `return_token_ids`, `token_ids`."""
from __future__ import annotations

import time

from gateway.openai_request import CHAT, OpenAIRequest
from protos.tandem.v1 import generation_pb2 as api

_FINISH = {api.FINISH_REASON_STOP: "stop", api.FINISH_REASON_LENGTH: "length", api.FINISH_REASON_CANCELLED: "abort"}


def usage(u: api.Usage | None) -> dict:
    prompt, completion, cached = (u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens) if u else (0, 0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def summed_usage(usages: list[api.Usage]) -> api.Usage:
    total = api.Usage()
    for u in usages:
        total.prompt_tokens += u.prompt_tokens
        total.completion_tokens += u.completion_tokens
        total.cached_prompt_tokens += u.cached_prompt_tokens
    return total


def _stop_reason(msg) -> str | int | None:
    which = msg.WhichOneof("stop_reason")
    return getattr(msg, which) if which is not None else None


class ResponseBuilder:
    """Builds one HTTP request's response objects; keeps each choice's streaming state (role sent, text offset)."""

    def __init__(self, req: OpenAIRequest, request_id: str) -> None:
        self.req = req
        self.chat = req.kind == CHAT
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{request_id}"
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"
        self._started: set[int] = set()
        self._offsets: dict[int, int] = {}   # completions logprobs' text_offset, per choice

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.req.model, "choices": choices}

    # --- streaming ---------------------------------------------------------------------------------------------------

    def chunk(self, c: api.GenerateStreamResponse) -> dict | None:
        """The SSE object for one stream message, or None when it carries nothing the client would see."""
        first = c.index not in self._started
        logprobs = self.req.logprobs and (c.logprobs or (self.req.prompt_logprobs and c.prompt_logprobs))
        if not (c.text or c.finish_reason or first or logprobs or (self.req.return_token_ids and c.token_ids)):
            return None
        self._started.add(c.index)
        choice: dict = {"index": c.index}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": c.text} if first else {"content": c.text}
        else:
            choice["text"] = c.text
        choice["logprobs"] = self._logprobs(c.index, c.logprobs, c.prompt_logprobs) if self.req.logprobs else None
        choice["finish_reason"] = _FINISH.get(c.finish_reason)
        if c.finish_reason:
            choice["stop_reason"] = _stop_reason(c)
        if self.req.return_token_ids:
            choice["token_ids"] = list(c.token_ids)
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [choice])
        if self.req.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, u: api.Usage | None) -> dict:
        """The last chunk with stream_options.include_usage: no choices, the request's usage."""
        out = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        out["usage"] = usage(u)
        return out

    # --- whole --------------------------------------------------------------------------------------------------------

    def whole(self, responses: list[api.GenerateResponse]) -> dict:
        """One response per prompt, in prompt order; choice indices run on across prompts (OpenAI's order)."""
        choices = []
        for p, resp in enumerate(responses):
            for c in resp.completions:
                index = p * len(resp.completions) + c.index
                choice: dict = {"index": index}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                else:
                    choice["text"] = c.text
                choice["logprobs"] = self._logprobs(index, c.logprobs, resp.prompt_logprobs) \
                    if self.req.logprobs else None
                choice["finish_reason"] = _FINISH.get(c.finish_reason)
                choice["stop_reason"] = _stop_reason(c)
                if self.req.return_token_ids:
                    choice["token_ids"] = list(c.token_ids)
                choices.append(choice)
        out = self._envelope(self.object, choices)
        out["usage"] = usage(summed_usage([r.usage for r in responses]))
        return out

    # --- logprobs ----------------------------------------------------------------------------------------------------

    def _logprobs(self, index: int, entries, prompt_entries) -> dict:
        if self.chat:
            return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
                                 "top_logprobs": [{"token": t.token, "logprob": t.logprob,
                                                   "bytes": list(t.token.encode())} for t in e.top]}
                                for e in entries],
                    "refusal": None}
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = self._offsets.get(index, 0)
        # The echoed prompt first (completions with echo): its first token has no logprob.
        scored = ([(e, k > 0) for k, e in enumerate(prompt_entries)] if self.req.prompt_logprobs else []) + \
            [(e, True) for e in entries]
        for e, has_logprob in scored:
            tokens.append(e.token)
            token_logprobs.append(e.logprob if has_logprob else None)
            top.append({t.token: t.logprob for t in e.top} if has_logprob else None)
            offsets.append(offset)
            offset += len(e.token)
        self._offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}
