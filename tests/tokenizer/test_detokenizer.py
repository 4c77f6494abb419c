"""The Detokenize stream state at the protobuf level: one output per input, opens/steps/closes semantics."""
from __future__ import annotations

from protos.tandem.internal.v1 import engine_pb2, tokenizer_pb2 as pb
from tokenizer_svc import Detokenizer

NONE = engine_pb2.ENGINE_FINISH_NONE
STOP_TOKEN = engine_pb2.ENGINE_FINISH_STOP_TOKEN
LENGTH = engine_pb2.ENGINE_FINISH_LENGTH


def ids_of(smollm, text):
    return smollm.tokenizer.encode(text, add_special_tokens=False).ids


def test_open_and_step_in_one_message_then_close(smollm):
    detok = Detokenizer(smollm.tokenizer)
    ids = ids_of(smollm, "Hello there")
    out = detok.handle(pb.DetokenizeInput(opens=[pb.DetokOpen(request_id="a")],
                                          steps=[pb.DetokStep(request_id="a", token_ids=ids[:1])]))
    assert [(r.request_id, r.text, list(r.token_ids), r.finished) for r in out.results] == [
        ("a", "Hello", ids[:1], False)]
    # A step and a close in one message: the step is answered, then the state is dropped.
    out = detok.handle(pb.DetokenizeInput(steps=[pb.DetokStep(request_id="a", token_ids=ids[1:])], closes=["a"]))
    assert out.results[0].text == " there"
    assert "a" not in detok and len(detok) == 0


def test_unknown_closed_and_finished_requests_are_ignored(smollm):
    detok = Detokenizer(smollm.tokenizer)
    ids = ids_of(smollm, "x")
    detok.handle(pb.DetokenizeInput(opens=[pb.DetokOpen(request_id="done"), pb.DetokOpen(request_id="closed")],
                                    closes=["closed"]))
    out = detok.handle(pb.DetokenizeInput(steps=[pb.DetokStep(request_id="done", token_ids=ids, finish=LENGTH)]))
    assert out.results[0].finished and out.results[0].finish == LENGTH
    out = detok.handle(pb.DetokenizeInput(steps=[pb.DetokStep(request_id=r, token_ids=ids)
                                                 for r in ("done", "closed", "never-opened")]))
    assert list(out.results) == []  # still one (empty) output for the input
    assert len(detok) == 0


def test_stop_hit_truncates_token_ids(smollm):
    detok = Detokenizer(smollm.tokenizer)
    ids = ids_of(smollm, "one two three four")
    detok.handle(pb.DetokenizeInput(opens=[pb.DetokOpen(request_id="r", stop=["three"])]))
    out = detok.handle(pb.DetokenizeInput(steps=[pb.DetokStep(request_id="r", token_ids=ids)]))
    (result,) = out.results
    assert result.text == "one two " and result.matched_stop == "three" and result.finished
    assert result.finish == NONE
    assert list(result.token_ids) == ids[:3]  # "one", " two", " three"
    assert len(detok) == 0


def test_stop_token_finish(smollm):
    detok = Detokenizer(smollm.tokenizer)
    ids = ids_of(smollm, "Yes.") + [2]
    out = detok.handle(pb.DetokenizeInput(opens=[pb.DetokOpen(request_id="r", skip_special_tokens=False)],
                                          steps=[pb.DetokStep(request_id="r", token_ids=ids, finish=STOP_TOKEN)]))
    (result,) = out.results
    assert (result.text, list(result.token_ids), result.finished, result.finish) == ("Yes.", ids, True, STOP_TOKEN)


def test_reopen_restarts_state(smollm):
    detok = Detokenizer(smollm.tokenizer)
    ids = ids_of(smollm, "ab STOP")
    detok.handle(pb.DetokenizeInput(opens=[pb.DetokOpen(request_id="r", stop=["STOP!"])],
                                    steps=[pb.DetokStep(request_id="r", token_ids=ids)]))
    out = detok.handle(pb.DetokenizeInput(opens=[pb.DetokOpen(request_id="r")],
                                          steps=[pb.DetokStep(request_id="r", token_ids=ids, finish=LENGTH)]))
    assert out.results[0].text == "ab STOP"  # the old held-back text is gone with the old state


def test_one_requests_failure_is_its_own_result_and_the_others_go_on(smollm, monkeypatch):
    from tokenizer_svc.request_detok import RequestDetokenizer

    det = Detokenizer(smollm.tokenizer)
    real_step = RequestDetokenizer.step

    def step(self, token_ids, finish):
        if self is det._requests.get("bad"):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "planted")
        return real_step(self, token_ids, finish)

    monkeypatch.setattr(RequestDetokenizer, "step", step)
    ids = ids_of(smollm, "Hello world")
    out = det.handle(pb.DetokenizeInput(
        opens=[pb.DetokOpen(request_id=r) for r in ("a", "bad", "b")],
        steps=[pb.DetokStep(request_id=r, token_ids=ids) for r in ("a", "bad", "b")]))
    by_id = {r.request_id: r for r in out.results}
    assert by_id["a"].text == by_id["b"].text == "Hello world" and not by_id["a"].error
    assert by_id["bad"].finished and by_id["bad"].error.startswith("UnicodeDecodeError") and not by_id["bad"].text
    assert "bad" not in det and "a" in det and "b" in det
