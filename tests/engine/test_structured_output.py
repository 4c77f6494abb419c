"""Structured output's parts, on a small vocabulary of single characters: the compiler (errors naming the field,
the cache by spec), the matcher that follows a request's output tokens, the batched mask on the logits, the
scheduler's ready predicate and the contract conversion."""
from __future__ import annotations

import string
import threading
import time

import pytest
import torch

from engine_svc.core.kv_cache_manager import KVCacheManager
from engine_svc.core.request import PLACEHOLDER, FinishReason, Request, SamplingParams, StructuredOutput
from engine_svc.core.scheduler import Scheduler, SchedulerConfig
from engine_svc.service.proto_convert import params_from_pb
from protos.tandem.internal.v1 import engine_pb2 as pb

xgr = pytest.importorskip("xgrammar")

from engine_svc.sampling.logits_processors import apply_token_bitmask  # noqa: E402
from engine_svc.structured.compiler import GrammarCompilers, GrammarError, choice_grammar  # noqa: E402
from engine_svc.structured.manager import StructuredOutputs, model_vocabulary  # noqa: E402
from engine_svc.structured.matchers import GrammarMatchers  # noqa: E402

EOS = 0
CHARS = string.digits + string.ascii_letters + "-{}[]:,\" "
VOCAB = ["</s>"] + list(CHARS)                     # id 1 + i is CHARS[i]
ID = {c: i for i, c in enumerate(VOCAB)}
DATE = StructuredOutput("regex", r"\d{4}-\d{2}-\d{2}")


def char_vocab() -> "xgr.TokenizerInfo":
    tokens = [""] + VOCAB[1:]   # an empty string is never text: the EOS control token
    return xgr.TokenizerInfo(tokens, xgr.VocabType.RAW, vocab_size=len(VOCAB), stop_token_ids=[EOS])


def ids(text: str) -> list[int]:
    return [ID[c] for c in text]


def compiled(spec: StructuredOutput):
    return GrammarCompilers(char_vocab).get(spec).result(timeout=30)


def allowed(bitmask_row: torch.Tensor) -> set[int]:
    return {t for t in range(len(VOCAB)) if (int(bitmask_row[t // 32]) >> (t % 32)) & 1}


def request(rid: str, output: list[int], spec: StructuredOutput | None = DATE) -> Request:
    r = Request(rid, [5, 6], SamplingParams(structured_output=spec), arrival=0)
    r.token_ids += output
    return r


# --- compiler ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,reason", [
    (StructuredOutput("regex", "(ab"), "parenthesis"),
    (StructuredOutput("json_schema", '{"type": "nonsense"}'), "nonsense"),
    (StructuredOutput("grammar", "root ::= undefined_rule"), "undefined_rule"),
])
def test_a_spec_that_does_not_compile_names_its_field_and_why(spec, reason):
    fut = GrammarCompilers(char_vocab).get(spec)
    with pytest.raises(GrammarError) as e:
        fut.result(timeout=30)
    message = str(e.value)
    assert message.startswith(f"params.structured_output.{spec.kind}: ") and reason in message
    assert ".cc:" not in message   # xgrammar's source location is left out


def test_compilations_are_cached_by_spec_and_run_off_the_callers_thread():
    threads, done = [], []

    def vocab():
        threads.append(threading.current_thread().name)
        return char_vocab()

    compilers = GrammarCompilers(vocab, on_done=lambda: done.append(1))
    first = compilers.get(DATE)
    assert compilers.get(StructuredOutput("regex", r"\d{4}-\d{2}-\d{2}")) is first   # equal spec, same future
    first.result(timeout=30)
    assert compilers.get(StructuredOutput("regex", r"\d+")) is not first
    compilers.get(StructuredOutput("regex", r"\d+")).result(timeout=30)
    assert len(threads) == 1 and threads[0].startswith("grammar-compile")   # the vocabulary: once, on the pool
    deadline = time.monotonic() + 5
    while len(done) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(done) == 2   # one wake-up per compilation


def test_choice_grammar_escapes_quotes_backslashes_and_newlines():
    choices = ('say "hi"', "back\\slash", "two\nlines", "ünï")
    g = xgr.Grammar.from_ebnf(choice_grammar(choices))
    from xgrammar.testing import _is_grammar_accept_string as accepts
    assert all(accepts(g, c) for c in choices)
    assert not accepts(g, "say hi") and not accepts(g, "two")


# --- matchers and the mask ---------------------------------------------------------------------------------------

def test_the_mask_follows_the_output_tokens():
    m = GrammarMatchers(len(VOCAB), max_rows=4)
    g = compiled(DATE)
    a, b = request("a", ids("2024-0")), request("b", [])
    bits, rows, broken = m.fill([(0, a, g), (2, b, g)])
    assert rows == [0, 2] and not broken
    assert allowed(bits[0]) == set(ids(string.digits)) and allowed(bits[2]) == set(ids(string.digits))
    a.token_ids += ids("1-15")
    bits, _, _ = m.fill([(0, a, g)])
    assert allowed(bits[0]) == {EOS}   # the date is complete: only the end may follow


def test_a_shorter_output_rolls_the_matcher_back():
    m = GrammarMatchers(len(VOCAB), max_rows=1)
    g = compiled(DATE)
    a = request("a", ids("2024-"))
    m.fill([(0, a, g)])
    del a.token_ids[-1]                              # the output lost its "-" (never in practice: outputs only grow)
    bits, _, _ = m.fill([(0, a, g)])
    assert allowed(bits[0]) == {ID["-"]}


def test_a_pending_or_disallowed_token_breaks_only_its_request():
    m = GrammarMatchers(len(VOCAB), max_rows=3)
    g = compiled(DATE)
    pending, wrong, fine = request("p", ids("20") + [PLACEHOLDER]), request("w", ids("20x")), request("f", ids("2"))
    _, rows, broken = m.fill([(0, pending, g), (1, wrong, g), (2, fine, g)])
    assert rows == [2]
    assert "pending" in broken["p"] and "does not follow" in broken["w"]


def test_finished_requests_lose_their_matchers():
    m = GrammarMatchers(len(VOCAB), max_rows=2)
    g = compiled(DATE)
    m.fill([(0, request("a", []), g), (1, request("b", []), g)])
    m.forget_finished({"b"})
    assert len(m) == 1


def test_the_bitmask_is_applied_to_the_listed_rows_only():
    m = GrammarMatchers(len(VOCAB), max_rows=3)
    bits, rows, _ = m.fill([(1, request("a", ids("2024")), compiled(DATE))])
    logits = torch.zeros(3, len(VOCAB))
    apply_token_bitmask(logits, bits, torch.tensor(rows, dtype=torch.int32))
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()
    assert {t for t in range(len(VOCAB)) if logits[1, t] == 0} == {ID["-"]}
    assert (logits[1] == float("-inf")).sum() == len(VOCAB) - 1


# --- the engine's view: readiness and errors -----------------------------------------------------------------------

def char_outputs() -> StructuredOutputs:
    return StructuredOutputs(char_vocab, len(VOCAB), max_rows=4)


def test_a_request_is_ready_once_take_errors_has_seen_its_grammar_compiled():
    so = char_outputs()
    r = request("a", [])
    so.start("a", DATE)
    assert not so.is_ready(r)
    so.wait(timeout=30)
    assert not so.is_ready(r)                 # compiled, but not yet seen by the loop
    assert so.take_errors() == ([], []) and so.is_ready(r)
    so.start("b", DATE)                       # compiled already: ready at once
    assert so.is_ready(request("b", []))


def test_a_bad_spec_is_reported_once_then_refused_at_start():
    so = char_outputs()
    bad = StructuredOutput("regex", "[")
    so.start("a", bad)
    so.wait(timeout=30)
    failed, broken = so.take_errors()
    assert [rid for rid, _ in failed] == ["a"] and isinstance(failed[0][1], GrammarError) and not broken
    assert so.take_errors() == ([], [])
    with pytest.raises(GrammarError, match=r"^params\.structured_output\.regex: "):
        so.start("b", bad)


def test_a_model_without_a_vocabulary_rejects_structured_requests(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    gate, vocabulary = threading.Event(), model_vocabulary(str(tmp_path / "config.json"), 10, (0,))
    so = StructuredOutputs(lambda: gate.wait(30) and vocabulary(), 10, max_rows=1)
    so.start("a", DATE)   # held until the gate opens: the failure comes later, through take_errors
    gate.set()
    so.wait(timeout=60)
    (rid, e), = so.take_errors()[0]
    assert isinstance(e, GrammarError) and "no tokenizer vocabulary" in str(e) and str(e).startswith(DATE.field)


# --- scheduler -----------------------------------------------------------------------------------------------------

def test_a_request_waiting_for_its_grammar_keeps_its_place_while_others_run():
    ready = {"a": False}
    kv = KVCacheManager(16, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32), kv, frozenset({99}),
                  is_ready=lambda r: ready.get(r.request_id, True))
    s.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4, structured_output=DATE))
    s.add_request("b", [4, 5, 6], SamplingParams(max_tokens=4))
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["b"] and s.waiting[0].request_id == "a"
    s.update(out, [7])
    ready["a"] = True
    assert [x.request.request_id for x in s.schedule().scheduled] == ["b", "a"]


def test_reject_ends_a_waiting_request_and_its_group():
    kv = KVCacheManager(16, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32), kv, frozenset({99}),
                  is_ready=lambda r: False)
    s.add_request("g", [1, 2, 3], SamplingParams(max_tokens=4, n=3, best_of=3, structured_output=DATE))
    out, = s.reject("g", "params.structured_output.regex: bad")
    assert (out.finish_reason, out.error, out.last) == (FinishReason.REJECTED, "params.structured_output.regex: bad",
                                                        True)
    assert not s.has_work and not s.is_live("g")


# --- the contract ----------------------------------------------------------------------------------------------------

def test_structured_output_reaches_sampling_params():
    base = dict(top_p=1.0, max_tokens=4)
    cases = [(pb.StructuredOutput(json_schema='{"type": "integer"}'), StructuredOutput("json_schema",
                                                                                        '{"type": "integer"}')),
             (pb.StructuredOutput(json_object=True), StructuredOutput("json_object")),
             (pb.StructuredOutput(regex="a+"), StructuredOutput("regex", "a+")),
             (pb.StructuredOutput(choice=pb.ChoiceList(choices=["x", "y"])), StructuredOutput("choice",
                                                                                              choices=("x", "y"))),
             (pb.StructuredOutput(grammar='root ::= "a"'), StructuredOutput("grammar", 'root ::= "a"'))]
    for so, expected in cases:
        assert params_from_pb(pb.SamplingParams(structured_output=so, **base), 10).structured_output == expected
    assert params_from_pb(pb.SamplingParams(**base), 10).structured_output is None


@pytest.mark.parametrize("params,message", [
    (dict(structured_output=pb.StructuredOutput()), "set one of"),
    (dict(structured_output=pb.StructuredOutput(json_object=False)), "json_object: must be true"),
    (dict(structured_output=pb.StructuredOutput(choice=pb.ChoiceList(choices=["a", ""]))), "none of them empty"),
    (dict(structured_output=pb.StructuredOutput(regex="")), "regex: must not be empty"),
    (dict(structured_output=pb.StructuredOutput(regex="a"), ignore_eos=True), "with ignore_eos"),
    (dict(structured_output=pb.StructuredOutput(regex="a"), min_tokens=2), "with min_tokens"),
    (dict(structured_output=pb.StructuredOutput(regex="a"), use_beam_search=True), "with use_beam_search"),
])
def test_bad_structured_output_is_refused(params, message):
    with pytest.raises(ValueError, match=message):
        params_from_pb(pb.SamplingParams(top_p=1.0, max_tokens=4, **params), vocab_size=10)
