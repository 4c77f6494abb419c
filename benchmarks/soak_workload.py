"""The seeded request mix of `tandem bench soak`: each planned call says what it sends, how it ends early (a client
cancel after a delay, a deadline), which final statuses are correct for it, and, for the greedy repeats, the
tokens it must return.

Kinds (share of the calls):
- plain: one short completion, greedy or sampled;
- integrity: a greedy repeat of one of a few fixed prompts (ignore_eos, so always max_tokens tokens), n 1 or 2,
  half of them under request ids shared with other calls in flight; greedy by temperature 0, by a denormal
  temperature, or by sampling from the top 1; each output must equal the prompt's warm-up output (temperature
  0, alone), so a token of another request in it shows;
- cancel: a longer stream or call the client cancels after a random delay;
- deadline: a longer call under a short deadline;
- n_best_of: sampling with n, best_of and logprobs;
- beam: beam search with width, n and length_penalty in [-10, 10];
- stop: stop strings, with and without include_stop_str_in_output;
- fuzz: a case of benchmarks/request_fuzz.py (valid or not, raw bytes included).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from benchmarks.request_fuzz import F32_DENORMAL_MIN, METHODS, RequestFuzzer
from protos.tandem.v1 import generation_pb2 as api

KINDS = {"plain": 0.17, "integrity": 0.15, "cancel": 0.12, "deadline": 0.10, "n_best_of": 0.10, "beam": 0.08,
         "stop": 0.08, "fuzz": 0.20}
INTEGRITY_PROMPTS = ("The capital of France is", "Once upon a time", "def fibonacci(n):", "My favourite food is")
# Client request ids used by several calls in flight at once, some shaped like the ids of another call's outputs.
SHARED_IDS = ("soak-shared", "soak-shared#0", "soak-shared#1", "soak-shared-2")
WORDS = ("the", "cat", "sat", "on", "mat", "Hello", "world", "tell", "me", "about", "water", "moon", "code", "why")

OK = grpc.StatusCode.OK
# A well-formed request under load: it runs, or the server says it is full.
SERVED = frozenset({OK, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class PlannedCall:
    index: int
    kind: str
    method: str                        # Generate | GenerateStream
    payload: bytes                     # the serialized GenerateRequest, or raw bytes for a raw fuzz case
    request: api.GenerateRequest | None   # None for raw bytes
    expected: frozenset                # the final statuses that are correct for it
    timeout_s: float | None = None     # the call's gRPC deadline
    cancel_after_s: float | None = None
    integrity_prompt: str = ""         # a greedy repeat: its outputs must equal this prompt's warm-up output


# Sampling settings that all pick the most likely token: greedy.
GREEDY_WAYS = {"temperature 0": {"temperature": 0.0}, "denormal temperature": {"temperature": F32_DENORMAL_MIN},
               "top 1 of sampling": {"temperature": 1.0, "top_k": 1, "seed": 7}}


def integrity_request(prompt: str, max_tokens: int, n: int = 1, greedy: str = "temperature 0") -> api.GenerateRequest:
    return api.GenerateRequest(prompt=prompt, params=api.GenerationParams(max_tokens=max_tokens, ignore_eos=True,
                                                                          n=n, **GREEDY_WAYS[greedy]))


class SoakWorkload:
    def __init__(self, vocab_size: int, max_tokens: int, long_max_tokens: int) -> None:
        self.max_tokens = max_tokens            # the cap of every kind but cancel and deadline
        self.long_max_tokens = long_max_tokens  # cancel and deadline calls: long enough to be cut short
        self.fuzzer = RequestFuzzer(vocab_size, max_tokens_cap=max_tokens)

    def plan(self, num_calls: int, seed: int, weights: dict[str, float] | None = None) -> list[PlannedCall]:
        """`weights`: kind -> weight, KINDS when None."""
        weights = weights or KINDS
        rng = random.Random(seed)
        kinds = rng.choices(tuple(weights), weights=tuple(weights.values()), k=num_calls)
        return [getattr(self, "_" + kind)(rng, i) for i, kind in enumerate(kinds)]

    def _call(self, i: int, kind: str, rng: random.Random, request: api.GenerateRequest,
              expected: frozenset = SERVED, **extra) -> PlannedCall:
        return PlannedCall(i, kind, rng.choice(tuple(METHODS)), request.SerializeToString(), request, expected,
                           **extra)

    def _prompt(self, rng: random.Random) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))

    def _plain(self, rng: random.Random, i: int) -> PlannedCall:
        params = api.GenerationParams(max_tokens=rng.randint(1, self.max_tokens))
        if rng.random() < 0.5:
            params.temperature = 0
        else:
            params.temperature, params.top_p, params.seed = 0.8, 0.95, rng.randrange(2**32)
        req = api.GenerateRequest(prompt=self._prompt(rng), params=params, priority=rng.randint(-1, 1))
        if rng.random() < 0.3:
            req.ClearField("prompt")
            req.chat.messages.add(role="user", content=self._prompt(rng))
        return self._call(i, "plain", rng, req)

    def _integrity(self, rng: random.Random, i: int) -> PlannedCall:
        prompt = rng.choice(INTEGRITY_PROMPTS)
        req = integrity_request(prompt, self.max_tokens, n=rng.choice((1, 1, 2)),
                                greedy=rng.choice(("temperature 0", "temperature 0", *GREEDY_WAYS)))
        req.cache_salt = rng.choice(("", "", "tenant-a", "tenant-b"))
        expected = SERVED
        if rng.random() < 0.5:
            # The same client request id on calls in flight together: each must still get only its own tokens
            # (or a precise rejection).
            req.request_id = rng.choice(SHARED_IDS)
            expected = SERVED | {grpc.StatusCode.INVALID_ARGUMENT}
        return self._call(i, "integrity", rng, req, expected, integrity_prompt=prompt)

    def _long(self, rng: random.Random) -> api.GenerateRequest:
        return api.GenerateRequest(prompt=self._prompt(rng), params=api.GenerationParams(
            max_tokens=rng.randint(self.max_tokens, self.long_max_tokens), temperature=rng.choice((0.0, 1.0)),
            ignore_eos=True, n=rng.choice((1, 1, 2))))

    def _cancel(self, rng: random.Random, i: int) -> PlannedCall:
        return self._call(i, "cancel", rng, self._long(rng), SERVED | {grpc.StatusCode.CANCELLED},
                          cancel_after_s=rng.uniform(0.0, 2.0))

    def _deadline(self, rng: random.Random, i: int) -> PlannedCall:
        return self._call(i, "deadline", rng, self._long(rng), SERVED | {grpc.StatusCode.DEADLINE_EXCEEDED},
                          timeout_s=rng.choice((0.001, 0.05, 0.3, 1.0, 3.0)))

    def _n_best_of(self, rng: random.Random, i: int) -> PlannedCall:
        n = rng.randint(1, 3)
        params = api.GenerationParams(max_tokens=rng.randint(1, self.max_tokens), temperature=rng.choice((0.7, 1.0)),
                                      n=n, best_of=n + rng.randint(0, 2), seed=rng.randrange(2**32))
        if rng.random() < 0.5:
            params.logprobs = rng.randint(0, 3)
        return self._call(i, "n_best_of", rng, api.GenerateRequest(prompt=self._prompt(rng), params=params))

    def _beam(self, rng: random.Random, i: int) -> PlannedCall:
        width = rng.randint(1, 4)
        # Now and then longer: a large |length_penalty| over many tokens pushes the scores to their extremes.
        longest = self.long_max_tokens if rng.random() < 0.3 else self.max_tokens
        params = api.GenerationParams(max_tokens=rng.randint(1, longest), use_beam_search=True,
                                      beam_width=width, n=rng.randint(1, width),
                                      length_penalty=rng.choice((1.0, 0.0, rng.uniform(-10.0, 10.0))))
        return self._call(i, "beam", rng, api.GenerateRequest(prompt=self._prompt(rng), params=params))

    def _stop(self, rng: random.Random, i: int) -> PlannedCall:
        params = api.GenerationParams(max_tokens=rng.randint(1, self.max_tokens), temperature=rng.choice((0.0, 1.0)),
                                      stop=rng.sample((" ", "e", ".", "\n", " the", ","), rng.randint(1, 3)),
                                      include_stop_str_in_output=rng.random() < 0.5)
        return self._call(i, "stop", rng, api.GenerateRequest(prompt=self._prompt(rng), params=params))

    def _fuzz(self, rng: random.Random, i: int) -> PlannedCall:
        case = self.fuzzer.case(rng)
        return PlannedCall(i, "fuzz", case.method, case.payload(), case.request, case.expected)
