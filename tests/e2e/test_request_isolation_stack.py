"""Issue 14's reproductions, through the public API on the default model: no request can crash the engine, hang,
collide with another by its request_id, or read another's tokens; malformed bytes and ids are refused with
INVALID_ARGUMENT, and an oversized prompt is refused before the tokenizer without touching anyone else's stream."""
from __future__ import annotations

import threading

import grpc
import pytest

from protos.tandem.v1 import generation_pb2 as api

P = api.GenerationParams
GREEDY16 = P(max_tokens=16, temperature=0.0, ignore_eos=True)


def text_of(responses) -> tuple[dict[int, str], dict[int, list[int]]]:
    text: dict[int, str] = {}
    ids: dict[int, list[int]] = {}
    for r in responses:
        text[r.index] = text.get(r.index, "") + r.text
        ids.setdefault(r.index, []).extend(r.token_ids)
    return text, ids


def fresh(api_stub, prompt: str, params: P) -> dict[int, list[int]]:
    return text_of(api_stub.GenerateStream(api.GenerateRequest(prompt=prompt, params=params), timeout=120))[1]


class Background:
    """A stream read to its end on a thread; started_event is set at its first chunk."""

    def __init__(self, api_stub, request: api.GenerateRequest) -> None:
        self.first = threading.Event()
        self.chunks: list = []
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._run, args=(api_stub, request))
        self._thread.start()

    def _run(self, api_stub, request) -> None:
        try:
            for chunk in api_stub.GenerateStream(request, timeout=120):
                self.chunks.append(chunk)
                self.first.set()
        except grpc.RpcError as e:
            self.error = e
        self.first.set()

    def result(self) -> dict[int, list[int]]:
        self._thread.join(150)
        assert self.error is None, self.error
        return text_of(self.chunks)[1]


def test_a_client_id_like_a_members_id_collides_with_nothing(api_stub):
    best_of = P(max_tokens=8, temperature=0.8, seed=11, n=1, best_of=2)
    two = P(max_tokens=12, temperature=0.8, seed=5, n=2, ignore_eos=True)
    expected = {"Z": fresh(api_stub, "Once upon", best_of), "X": fresh(api_stub, "The sea", two),
                "long": fresh(api_stub, "A long story:", P(max_tokens=24, temperature=0.0, ignore_eos=True)),
                "Y#0": fresh(api_stub, "Hello there", GREEDY16)}
    # Z#1 runs when Z (n=1, best_of=2) arrives; X#1 arrives while X (n=2) runs; Y#0 while Y (n=2, best_of=2) runs.
    z1 = Background(api_stub, api.GenerateRequest(prompt="A long story:", request_id="Z#1",
                                                  params=P(max_tokens=24, temperature=0.0, ignore_eos=True)))
    assert z1.first.wait(60)
    z = Background(api_stub, api.GenerateRequest(prompt="Once upon", request_id="Z", params=best_of))
    x = Background(api_stub, api.GenerateRequest(prompt="The sea", request_id="X", params=two))
    assert x.first.wait(60)
    x1 = Background(api_stub, api.GenerateRequest(prompt="Hello there", request_id="X#1", params=GREEDY16))
    y = Background(api_stub, api.GenerateRequest(prompt="The sea", request_id="Y", params=two))
    assert y.first.wait(60)
    y0 = Background(api_stub, api.GenerateRequest(prompt="Hello there", request_id="Y#0", params=GREEDY16))
    assert z1.result() == expected["long"] and z.result() == expected["Z"]
    assert x.result() == expected["X"] and y.result() == expected["X"]
    assert x1.result() == expected["Y#0"] and y0.result() == expected["Y#0"]


def test_a_reused_request_id_never_sees_the_previous_requests_tokens(api_stub):
    """20 times in a row: end stream R (cancel, deadline or stop string), then at once stream R again with another
    prompt. Each second R gives exactly a fresh request's 16 tokens."""
    expected = fresh(api_stub, "The weather today is", GREEDY16)
    first = P(max_tokens=64, temperature=0.0, ignore_eos=True)
    for i in range(20):
        how = ("cancel", "deadline", "stop")[i % 3]
        if how == "stop":
            params = P(max_tokens=64, temperature=0.0, ignore_eos=True, stop=[" the", ",", "."])
            list(api_stub.GenerateStream(api.GenerateRequest(prompt="Tell me a story", request_id="R",
                                                             params=params), timeout=60))
        else:
            call = api_stub.GenerateStream(api.GenerateRequest(prompt="Tell me a story", request_id="R",
                                                               params=first), timeout=60 if how == "cancel" else 0.4)
            try:
                next(call)
                if how == "cancel":
                    call.cancel()
                else:
                    for _ in call:
                        pass
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
        again = api_stub.GenerateStream(api.GenerateRequest(prompt="The weather today is", request_id="R",
                                                            params=GREEDY16), timeout=120)
        responses = list(again)
        assert text_of(responses)[1] == expected, f"try {i} ({how})"
        assert responses[-1].usage.completion_tokens == 16 and {r.request_id for r in responses} == {"R"}


@pytest.mark.parametrize("length_penalty", [1e10, -3.4e38, 3.4e38, -30.0, -100.00001])
def test_beam_search_length_penalty_out_of_range_is_refused(api_stub, length_penalty):
    request = api.GenerateRequest(prompt="Hello there", params=P(
        max_tokens=4, use_beam_search=True, beam_width=2, length_penalty=length_penalty))
    with pytest.raises(grpc.RpcError) as err:
        api_stub.Generate(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "params.length_penalty: must be in [-10, 10]" in err.value.details()


@pytest.mark.parametrize("length_penalty", [-10.0, 10.0])
def test_beam_search_at_the_range_ends_is_answered(api_stub, length_penalty):
    request = api.GenerateRequest(prompt="Hello there", params=P(
        max_tokens=4, use_beam_search=True, beam_width=2, n=2, length_penalty=length_penalty))
    resp = api_stub.Generate(request, timeout=60)
    assert len(resp.completions) == 2 and all(c.token_ids for c in resp.completions)


@pytest.mark.parametrize("request_id,why", [("a\nfinish status=OK", "printable ASCII"), ("x" * 100_000, "at most 128"),
                                            ("nul\x00id", "printable ASCII"), ("caf\u00e9", "printable ASCII")])
def test_a_bad_request_id_in_the_body_is_refused_like_the_header(api_stub, stack, request_id, why):
    request = api.GenerateRequest(prompt="Hi", request_id=request_id, params=P(max_tokens=2))
    with pytest.raises(grpc.RpcError) as err:
        api_stub.Generate(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request_id: ") and why in err.value.details()
    assert "a\nfinish" not in stack.log.read_text()


def test_an_oversized_prompt_is_refused_before_the_tokenizer_and_hurts_no_one(api_stub):
    expected = fresh(api_stub, "A long story:", P(max_tokens=24, temperature=0.0, ignore_eos=True))
    other = Background(api_stub, api.GenerateRequest(prompt="A long story:",
                                                     params=P(max_tokens=24, temperature=0.0, ignore_eos=True)))
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as err:
            api_stub.Generate(api.GenerateRequest(prompt="\U0001d54f" * 990_000), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert "cannot fit the model's context" in err.value.details()
    # Under the byte bound but still too many tokens: the tokenizer refuses it without sending the ids back.
    with pytest.raises(grpc.RpcError) as err:
        api_stub.Generate(api.GenerateRequest(prompt="\U0001d54f" * 9_000), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "do not fit the model's context" in err.value.details()
    assert other.result() == expected


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff\xff", b"\x0a\x05abc", b"\x0a\x02\xff\xfe",
                                     bytes(range(256)), b"\x1a\x03\x08\xff"])
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_undecodable_bytes_get_invalid_argument(stack, payload, method):
    with grpc.insecure_channel(stack.address) as channel:
        path = f"/tandem.v1.Generation/{method}"
        call = channel.unary_unary(path) if method == "Generate" else channel.unary_stream(path)
        with pytest.raises(grpc.RpcError) as err:
            result = call(payload, timeout=30)
            if method == "GenerateStream":
                list(result)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "not a valid message" in err.value.details()


def test_a_denormal_temperature_is_greedy(api_stub):
    assert fresh(api_stub, "The capital of France is", P(max_tokens=8, temperature=1.4e-45)) == \
        fresh(api_stub, "The capital of France is", P(max_tokens=8, temperature=0.0))
