"""Random public-API calls, valid and invalid, for the fuzz test (tests/e2e/test_fuzz_api.py) and `tandem bench
soak`: every field of GenerateRequest and GenerationParams drawn from its valid range or from its edges (NaN,
infinities, denormals, huge and negative numbers, ids outside the vocabulary, empty and oversized strings, NUL,
newlines and non-ASCII text), plus raw bytes that are not a GenerateRequest on the wire.

Everything is drawn from one `random.Random`, so a seed replays a case (a hypothesis test draws seeds: its
`st.randoms()` would skew every draw towards the edges and leave almost no valid request). Accepted requests stay
cheap on a CPU: max_tokens is always set, to at most `max_tokens_cap`, prompts that reach the engine are short,
and long prompts only come past the model's context or the message size limit, where they are rejected before
any engine work.

A call's outcome, whatever the case: OK or one of ACCEPTED_ERRORS, never INTERNAL, UNKNOWN, UNAVAILABLE or a hang
(DEADLINE_EXCEEDED); raw bytes that do not parse get INVALID_ARGUMENT (RESOURCE_EXHAUSTED past the message size
limit). `check_response` lists what is wrong with an OK answer (output counts, finish reasons, token ids, lengths,
stop strings, usage).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from protos.tandem.v1 import generation_pb2 as api

ACCEPTED_ERRORS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE})
METHODS = {"Generate": api.GenerateResponse, "GenerateStream": api.GenerateStreamResponse}

F32_MAX = 3.4028234663852886e38
F32_DENORMAL_MIN = 1.401298464324817e-45
F32_NORMAL_MIN = 1.1754943508222875e-38
# Float edges every float field is tried with; the float32 field turns 1e39 into inf, 1e-46 into 0.
FLOAT_EDGES = (0.0, -0.0, F32_DENORMAL_MIN, -F32_DENORMAL_MIN, 1e-40, F32_NORMAL_MIN, 1e-30, 1e-7, -1.0, -30.0,
               10.0, -10.0, 1e10, -1e10, F32_MAX, -F32_MAX, 1e39, math.inf, -math.inf, math.nan)
UINT32_EDGES = (0, 1, 2, 16, 17, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1)
INT32_EDGES = (0, 1, -1, -2, 100, -100, 2**31 - 1, -2**31)
RAW_FORMS = ("random bytes", "truncated message", "length past the end", "invalid UTF-8 in prompt", "field number 0",
             "wire type 7", "overlong varint", "garbage after message", "params as a varint")

# Text pieces: plain words, whitespace and control characters, non-ASCII, the model's special-token spellings.
_WORDS = ("the", "cat", "sat", "on", "a", "mat", "Hello", "world", "def", "print(", "1", "2", "3", "and", "or")
_ODD = ("\n", "\t", "\r\n", " ", "\x00", "\x7f", "\x1b[31m", "é", "日本", "🙂", "👩\u200d👩\u200d👧", "\u200b",
        "\ufeff", "\U0010ffff", "e\u0301", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "</s>", "%s%n", "{{x}}", "\\")


@dataclass(frozen=True)
class FuzzCase:
    """One call: a message (`request`), or raw bytes that are not one (`raw`, request None)."""
    method: str                                # Generate | GenerateStream
    request: api.GenerateRequest | None = None
    raw: bytes = b""
    why: str = ""                              # for raw bytes: how they are broken
    expected: frozenset = field(default=frozenset({grpc.StatusCode.OK}) | ACCEPTED_ERRORS)

    def payload(self) -> bytes:
        return self.request.SerializeToString() if self.request is not None else self.raw

    def describe(self) -> str:
        if self.request is None:
            return f"{self.method} raw bytes ({self.why}, {len(self.raw)} bytes): {self.raw[:64]!r}"
        text = str(self.request)
        return f"{self.method} {text[:2000]}" + ("..." if len(text) > 2000 else "")


class RequestFuzzer:
    """Draws FuzzCases. Each request first draws how odd it is: the chance that a field takes an edge value
    instead of a valid one, from ODD_RATES (clean; about one odd field, the way a single bad value slips past
    validation; many odd fields)."""

    ODD_RATES = {0.0: 0.35, 0.03: 0.45, 0.2: 0.2}   # chance of a field's edge value: share of the requests

    def __init__(self, vocab_size: int, max_tokens_cap: int = 8, max_context_chars: int = 60_000,
                 max_request_bytes: int = 4 * 1024 * 1024) -> None:
        self.vocab_size = vocab_size
        self.max_tokens_cap = max_tokens_cap
        self.max_context_chars = max_context_chars   # a prompt of this many characters is past the model's context
        self.max_request_bytes = max_request_bytes
        self._rate = 0.0                             # the odd rate of the request being drawn

    def case(self, rng: random.Random, raw_share: float = 0.1) -> FuzzCase:
        method = rng.choice(tuple(METHODS))
        if rng.random() < raw_share:
            raw, why = self.raw_bytes(rng)
            # The size limit is checked before the bytes are parsed.
            too_big = len(raw) > self.max_request_bytes
            expected = grpc.StatusCode.RESOURCE_EXHAUSTED if too_big else grpc.StatusCode.INVALID_ARGUMENT
            return FuzzCase(method, raw=raw, why=why, expected=frozenset({expected}))
        return FuzzCase(method, request=self.request(rng))

    # --- the message -------------------------------------------------------------------------------------------

    def request(self, rng: random.Random) -> api.GenerateRequest:
        req = api.GenerateRequest()
        self._rate = rng.choices(tuple(self.ODD_RATES), weights=tuple(self.ODD_RATES.values()))[0]
        self._input(rng, req)
        self._params(rng, req.params)
        if rng.random() < 0.3:
            req.request_id = self._request_id(rng)
        if rng.random() < 0.2:
            req.priority = rng.choice(INT32_EDGES) if self._odd(rng) else rng.randint(-3, 3)
        if rng.random() < 0.2:
            req.cache_salt = ("s" * rng.choice((257, 10_000))) if self._odd(rng) else self.text(rng, 0, 4)
        if rng.random() < 0.05 or self._odd(rng):
            req.adapter = rng.choice(("nope", "x" * 65, "../../etc/passwd", "日本", "a\x00b", " ", "base"))
        return req

    def _input(self, rng: random.Random, req: api.GenerateRequest) -> None:
        r = rng.random()
        if r < self._rate:
            which = rng.randrange(5)
            if which == 0:
                return                                         # neither prompt nor chat
            if which == 1:
                req.prompt = ""
            elif which == 2:
                req.chat.SetInParent()                          # a chat without messages
            elif which == 3:
                req.prompt = " hello" * (self.max_context_chars // 6)   # past the model's context
            else:
                req.prompt = "x" * (self.max_request_bytes + 1)         # past the message size limit
        elif r < 0.7:
            req.prompt = self.text(rng, 1, 12)
        else:
            for _ in range(rng.randint(1, 3)):
                role = rng.choice(("system", "user", "assistant", "tool"))
                if self._odd(rng):
                    role = rng.choice(("", "wizard", "USER", "user\x00", "ユーザー"))
                req.chat.messages.add(role=role, content=self.text(rng, 0, 8))

    def _params(self, rng: random.Random, p: api.GenerationParams) -> None:
        p.max_tokens = 0 if self._odd(rng) else rng.randint(1, self.max_tokens_cap)
        self._float(rng, p, "temperature", lambda: rng.choice((0.0, 0.0, 0.5, 1.0, 1.5)))
        self._float(rng, p, "top_p", lambda: rng.choice((1.0, 0.9, 0.5, 0.01)))
        if rng.random() < 0.3:
            p.top_k = rng.choice(INT32_EDGES + (self.vocab_size, self.vocab_size + 1)) if self._odd(rng) \
                else rng.choice((-1, 0, 1, 5, 50))
        if rng.random() < 0.3:
            p.seed = rng.choice((0, 1, 2**63, 2**64 - 1)) if self._odd(rng) else rng.randrange(2**32)
        if rng.random() < 0.3:
            p.stop.extend(self._stops(rng))
        if rng.random() < 0.2:
            p.stop_token_ids.extend(self._token_ids(rng, rng.randint(1, 3)))
        self._float(rng, p, "min_p", lambda: rng.choice((0.0, 0.05, 0.5, 1.0)))
        self._float(rng, p, "repetition_penalty", lambda: rng.choice((1.0, 1.1, 2.0, 0.5)))
        self._float(rng, p, "presence_penalty", lambda: rng.uniform(-2.0, 2.0))
        self._float(rng, p, "frequency_penalty", lambda: rng.uniform(-2.0, 2.0))
        if rng.random() < 0.2:
            for _ in range(rng.choice((1, 2, 5, 1025)) if self._odd(rng) else rng.randint(1, 4)):
                bias = rng.choice(FLOAT_EDGES + (100.0, -100.0, 100.001)) if self._odd(rng) \
                    else rng.uniform(-100.0, 100.0)
                p.logit_bias[self._token_ids(rng, 1)[0]] = bias
        if rng.random() < 0.1:
            p.allowed_token_ids.extend(self._token_ids(rng, rng.randint(1, 6)))
        if rng.random() < 0.2:
            p.min_tokens = rng.choice(UINT32_EDGES) if self._odd(rng) else rng.randint(0, p.max_tokens)
        for name in ("ignore_eos", "include_stop_str_in_output", "echo"):
            setattr(p, name, rng.random() < 0.2)
        for name in ("skip_special_tokens", "spaces_between_special_tokens"):
            if rng.random() < 0.3:
                setattr(p, name, rng.random() < 0.5)
        self._group(rng, p)

    def _group(self, rng: random.Random, p: api.GenerationParams) -> None:
        """n, best_of, beam search, logprobs: the combinations as well as the single values."""
        if rng.random() < 0.3:
            p.n = rng.choice(UINT32_EDGES) if self._odd(rng) else rng.randint(1, 4)
        if rng.random() < 0.2:
            n = p.n if p.HasField("n") else 1
            p.best_of = rng.choice(UINT32_EDGES + (n - 1 if n else 0,)) if self._odd(rng) \
                else min(n + rng.randint(0, 2), 2**32 - 1)
        if rng.random() < 0.2 or self._odd(rng):
            p.use_beam_search = True
            if rng.random() < 0.5:
                p.ClearField("temperature")                   # beam search needs it 0 or unset
            if rng.random() < 0.4:
                n = p.n if p.HasField("n") else 1
                p.beam_width = rng.choice(UINT32_EDGES) if self._odd(rng) else min(n + rng.randint(0, 3), 2**32 - 1)
        if p.use_beam_search or self._odd(rng):
            r = rng.random()
            if r < 0.2 or self._odd(rng):         # the beam score's exponent: its edges matter most
                p.length_penalty = rng.choice(FLOAT_EDGES)
            elif r < 0.6:
                p.length_penalty = rng.uniform(-10.0, 10.0)
        for name in ("logprobs", "prompt_logprobs"):
            if rng.random() < 0.15:
                setattr(p, name, rng.choice(UINT32_EDGES + (20, 21)) if self._odd(rng) else rng.randint(0, 5))

    def _float(self, rng: random.Random, p: api.GenerationParams, name: str, valid) -> None:
        """An edge value at the request's odd rate; else unset (the default) half the time, or valid."""
        if self._odd(rng):
            setattr(p, name, rng.choice(FLOAT_EDGES))
        elif rng.random() < 0.5:
            setattr(p, name, valid())

    def _stops(self, rng: random.Random) -> list[str]:
        if self._odd(rng):
            return rng.choice(([""], ["ok", ""], ["s" * 257], ["."] * 17, ["\x00"], ["🙂", "\n"]))
        pool = (".", ",", " the", "\n", "e", "o", "日本", "<|im_end|>")
        return [rng.choice(pool) for _ in range(rng.randint(1, 3))]

    def _token_ids(self, rng: random.Random, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self._odd(rng):
                out.append(rng.choice((self.vocab_size, self.vocab_size + 1, 2**31, 2**32 - 1)))
            else:
                out.append(rng.choice((0, 1, 2, self.vocab_size - 1, rng.randrange(self.vocab_size))))
        return out

    def _request_id(self, rng: random.Random) -> str:
        if self._odd(rng) or rng.random() < 0.3:
            return rng.choice(("a\nb", "a\x00b", "日本語-id", "🙂", " ", "x" * 129, "y" * 10_000, "\r\n", "#0",
                               "a#1", "dup"))
        return f"fuzz-{rng.randrange(10**9)}"

    def text(self, rng: random.Random, lo: int, hi: int) -> str:
        return "".join(rng.choice(_ODD) if rng.random() < 0.2 else " " + rng.choice(_WORDS)
                       for _ in range(rng.randint(lo, hi)))

    def _odd(self, rng: random.Random) -> bool:
        return rng.random() < self._rate

    # --- raw bytes ---------------------------------------------------------------------------------------------

    def raw_bytes(self, rng: random.Random, why: str | None = None) -> tuple[bytes, str]:
        """Bytes that GenerateRequest cannot parse, broken in the way `why` (one of RAW_FORMS; default: drawn),
        and that way. Random bytes that happen to parse are drawn again (a few times, then a broken form is
        used), so every raw case must get INVALID_ARGUMENT."""
        valid = self.request(rng).SerializeToString() or b"\x0a\x02hi"
        forms = {
            "random bytes": lambda: rng.randbytes(rng.randint(1, 64)),
            "truncated message": lambda: valid[:rng.randrange(len(valid))] + b"\x0a\x7f",
            "length past the end": lambda: b"\x0a" + bytes([rng.randint(3, 127)]) + b"hi",
            "invalid UTF-8 in prompt": lambda: b"\x0a\x03\xff\xfe\xfd",
            "field number 0": lambda: b"\x00\x01" + valid,
            "wire type 7": lambda: b"\x0f" + valid,
            "overlong varint": lambda: b"\x18" + b"\xff" * 11,
            "garbage after message": lambda: valid + rng.randbytes(rng.randint(1, 16)) + b"\x0f",
            "params as a varint": lambda: b"\x1a" + bytes([rng.randint(3, 120)]) + b"\x08\xff\xff\xff\xff\xff",
        }
        assert tuple(forms) == RAW_FORMS
        why = why or rng.choice(RAW_FORMS)
        for _ in range(8):
            raw = forms[why]()
            if not parses(raw):
                return raw, why
        return b"\x0a\x03\xff\xfe\xfd", "invalid UTF-8 in prompt"


def parses(raw: bytes) -> bool:
    try:
        api.GenerateRequest.FromString(raw)
        return True
    except DecodeError:
        return False


# --- sending and checking ------------------------------------------------------------------------------------------

def multi_callable(channel, method: str):
    """A call of `method` on `channel` (plain or asyncio) that sends bytes as they are, so raw cases and messages
    go the same way, and parses the answer."""
    path = f"/tandem.v1.Generation/{method}"
    make = channel.unary_unary if method == "Generate" else channel.unary_stream
    return make(path, request_serializer=None, response_deserializer=METHODS[method].FromString)


def outputs_of(method: str, messages: list) -> dict[int, tuple[list[int], str, int]]:
    """Output index -> (token ids, text, finish reason) of an OK answer: a Generate response or a whole stream."""
    if method == "Generate":
        return {c.index: (list(c.token_ids), c.text, c.finish_reason) for c in messages[0].completions}
    outputs: dict[int, tuple[list[int], str, int]] = {}
    for m in messages:
        ids, text, _ = outputs.get(m.index, ([], "", 0))
        outputs[m.index] = (ids + list(m.token_ids), text + m.text, m.finish_reason)
    return outputs


def check_response(method: str, req: api.GenerateRequest | None, messages: list, vocab_size: int) -> list[str]:
    """What is wrong with an OK answer to `req` sent to `method`: the Generate response (one message) or the whole
    stream. `req` None: raw bytes, which must never be answered OK."""
    if req is None:
        return [f"raw bytes that do not parse were answered OK: {messages[:1]}"]
    p = req.params
    n = p.n if p.HasField("n") else 1
    problems: list[str] = []
    if req.request_id and any(m.request_id != req.request_id for m in messages):
        problems.append(f"request_id {req.request_id!r} came back as {messages[0].request_id!r}")
    outputs = outputs_of(method, messages)
    if method == "Generate":
        usage = messages[0].usage
        if len(messages[0].completions) != n:
            problems.append(f"{len(messages[0].completions)} completions for n={n}")
    else:
        usage = messages[-1].usage if messages and messages[-1].HasField("usage") else None
        finishes = [m.index for m in messages if m.finish_reason]
        if sorted(finishes) != list(range(n)):
            problems.append(f"finishing messages for output indexes {sorted(finishes)}, n={n}")
        if usage is None:
            problems.append("the last stream message carries no usage")
    if sorted(outputs) != list(range(n)):
        problems.append(f"output indexes {sorted(outputs)} for n={n}")
    echoed = usage.prompt_tokens if (usage is not None and p.echo) else 0
    generated = 0
    for index, (ids, text, finish) in sorted(outputs.items()):
        if finish not in (api.FINISH_REASON_STOP, api.FINISH_REASON_LENGTH):
            problems.append(f"output {index} ended with {api.FinishReason.Name(finish)}")
        if any(t >= vocab_size for t in ids):
            problems.append(f"output {index} has token ids outside the vocabulary: {ids}")
        if p.HasField("max_tokens") and len(ids) - echoed > p.max_tokens:
            problems.append(f"output {index} has {len(ids) - echoed} tokens, max_tokens is {p.max_tokens}")
        generated += len(ids) - echoed
        if not p.echo and not p.include_stop_str_in_output and any(s and s in text for s in p.stop):
            problems.append(f"output {index} holds a stop string: {text!r}")
    if usage is not None and usage.completion_tokens != generated:
        problems.append(f"usage.completion_tokens {usage.completion_tokens}, the outputs hold {generated}")
    return problems
